"""How close the demo's pair-tokenizer student can get to its teacher on the demo's budget, given the best signal there
is: the teacher's exact translation into the student's tokens (q*, `bench/exact_translation_kl.py`) at every
response position, whole distributions, as if the teacher had the student's tokenizer.

A plain training loop with the demo's settings (batch 64, AdamW at 3e-3, betas (0.9, 0.98), 5% warmup, cosine to
0.1×, clip 1.0, fp32, 0.1·CE + 0.9·KL(q*‖q) per response token) from the student's initial weights, then scored by
`exact_translation_kl.score`. With the character student q* is the teacher's own distribution, which calibrates the
loop against the demo's KD student (`bench/divergence_demo.py --cross_tokenizer`, its "char tokenizer, KD" row).

    python bench/oracle_kd.py --dir OUT/seedS --student pair_student_init [--steps 250]

DIR is a `bench/divergence_demo.py --cross_tokenizer` seed folder; the trained model goes to DIR/oracle_<student>.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exact_translation_kl import score, translate  # noqa: E402


@torch.no_grad()
def targets(student_dir: str, teacher, t_tok, records: list[dict]) -> list[tuple[list[int], int, torch.Tensor]]:
    """Per record: the student's ids, its first response token's index, and log q* [response tokens, vocab]."""
    from transformers import AutoTokenizer

    s_tok = AutoTokenizer.from_pretrained(student_dir)
    out = []
    for r in records:
        s_ids, _, prompt, _, _, log_star = translate(teacher, s_tok, t_tok, r)
        out.append((s_ids, prompt, log_star.float()))
    return out


def train(model, data, steps: int, seed: int, batch: int = 64, lr: float = 3e-3, pad: int = 0) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = math.ceil(0.05 * steps)
    order: list[int] = []
    for step in range(steps):
        progress = (step - warmup) / max(1, steps - warmup)
        opt.param_groups[0]["lr"] = (lr * (step + 1) / warmup if step < warmup else
                                     0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * progress)))
        if len(order) < batch:
            order += rng.sample(range(len(data)), len(data))
        picked = [data[order.pop()] for _ in range(batch)]
        width = max(len(ids) for ids, _, _ in picked)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in picked])
        mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_, _, _ in picked])
        log_q = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
        loss, tokens = 0.0, 0
        for i, (sample, prompt, log_star) in enumerate(picked):
            rows = torch.arange(prompt - 1, len(sample) - 1)
            lq = log_q[i, rows, :log_star.shape[1]]
            ce = -lq.gather(1, torch.tensor(sample)[rows + 1, None]).sum()
            kl = torch.where(log_star > -math.inf, log_star.exp() * (log_star - lq), 0.0).sum()
            loss, tokens = loss + 0.1 * ce + 0.9 * kl, tokens + len(rows)
        opt.zero_grad()
        (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsdp_kd.testing.tiny import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--student", default="pair_student_init")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    student_dir, teacher_dir = os.path.join(args.dir, args.student), os.path.join(args.dir, "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(student_dir)
    data = targets(student_dir, teacher, t_tok, read_jsonl(os.path.join(args.dir, "data", "train.jsonl")))
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    train(model, data, args.steps, args.seed, pad=s_tok.pad_token_id)
    out = os.path.join(args.dir, f"oracle_{args.student}")
    model.save_pretrained(out)
    s_tok.save_pretrained(out)
    result = score(out, teacher_dir, os.path.join(args.dir, "data", "eval.jsonl"))
    print(f"| oracle KD, {args.student}, {args.steps} steps | " + " | ".join(f"{k} {v:.5f}" for k, v in result.items())
          + " |", flush=True)


if __name__ == "__main__":
    main()
