"""The demo's students scored against its teacher by the next byte, whatever each one's tokenizer: at every response
position where the student's and the teacher's contexts end at the same byte (each group's start, `cross_tokenizer.
Alignment`: one-to-one groups and groups of several tokens alike), KL(teacher‖student) between their distributions
of the next byte, each the sum of a model's next-token probabilities over the tokens that start with that byte
(a special token is a bucket of its own, by content).

`demo.aligned_scores` scores one-to-one positions only, with a student's pair-token mass as a bucket the teacher
leaves empty, so a student that writes "th" as one token where the teacher writes "t" then "h" is charged for it;
here both sides' probability of the next byte being "t" counts every token that starts with it.

    python bench/next_byte_kl.py --demo_out DEMO_OUT [--models kd_student kd_pair_student ...]

DEMO_OUT is a `python -m fsdp_kd.demo` (or `torchrun ... train.py`) output folder. Prints, per model, the mean KL
per scored response position and how many positions were scored.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def byte_keys(vocab) -> list:
    """Each token's bucket: its first byte, or for a special token (or one that spells nothing) its content."""
    return [spelled[:1] if regular and spelled else ("special", spelled)
            for spelled, regular in zip(vocab.spelled, vocab.regular)]


def merged(log_probs: torch.Tensor, keys: list, order: dict) -> torch.Tensor:
    """[rows, buckets] log-probabilities summed per bucket (`order`: bucket → column; -inf where none)."""
    index = torch.tensor([order[k] for k in keys])
    return torch.zeros(log_probs.shape[0], len(order), dtype=log_probs.dtype).index_add_(1, index,
                                                                                         log_probs.exp()).log()


@torch.no_grad()
def score(model_dir: str, teacher_dir: str, data: str) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsdp_kd.cross_tokenizer import Alignment, TeacherTokenization, TokenBytes
    from fsdp_kd.testing.tiny import read_jsonl

    s_tok, t_tok = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s_bytes, t_bytes = TokenBytes.of(s_tok), TokenBytes.of(t_tok)
    s_keys, t_keys = byte_keys(s_bytes), byte_keys(t_bytes)
    order = {k: i for i, k in enumerate(dict.fromkeys(s_keys + t_keys))}
    retokenize = TeacherTokenization(s_bytes, t_bytes, t_tok)
    kl, rows = 0.0, 0
    for r in read_jsonl(data):
        ids = s_tok(r["input"] + r["output"])["input_ids"] + [s_tok.eos_token_id]
        prompt = len(s_tok(r["input"])["input_ids"])
        t_ids, s_ends, t_ends, _ = retokenize.columns(ids)
        groups = Alignment(np.asarray(s_ends), np.asarray(t_ends))
        s_start = np.concatenate([[0], groups.student_ends])[:-1]
        t_start = np.concatenate([[0], groups.teacher_ends])[:-1]
        keep = (s_start >= prompt) & (t_start >= 1)
        s_rows, t_rows = torch.from_numpy(s_start[keep] - 1), torch.from_numpy(t_start[keep] - 1)
        log_q = torch.log_softmax(model(torch.tensor([ids])).logits[0, :, :len(s_tok)].double(), -1)[s_rows]
        log_p = torch.log_softmax(teacher(torch.tensor([t_ids])).logits[0, :, :len(t_tok)].double(), -1)[t_rows]
        q, p = merged(log_q, s_keys, order), merged(log_p, t_keys, order)
        kl += float(torch.where(p > -float("inf"), p.exp() * (p - q), 0.0).sum())
        rows += len(s_rows)
    return kl / max(rows, 1), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_out", required=True)
    parser.add_argument("--models", nargs="+", default=["kd_student", "ce_student", "kd_pair_student",
                                                        "ce_pair_student"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, data = os.path.join(args.demo_out, "teacher"), os.path.join(args.demo_out, "data", "eval.jsonl")
    print("| model | next-byte KL(teacher‖model) per response position | positions |")
    print("|---|---|---|")
    for name in args.models:
        value, rows = score(os.path.join(args.demo_out, name), teacher, data)
        print(f"| {name} | {value:.5f} | {rows} |", flush=True)


if __name__ == "__main__":
    main()
