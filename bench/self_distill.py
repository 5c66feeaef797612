"""Self-distillation with privileged context on the demo's toy translation task: the table of docs/on_policy.md.

    torchrun --nproc_per_node 2 bench/self_distill.py --out /tmp/self_distill [--seed 0]

A base model learns the task (`fsdp_kd.testing.tiny.translation_task`: each letter has three renderings, drawn
0.5/0.3/0.2) from two kinds of records: a bare prompt answered with a drawn rendering, and the same prompt after the
instruction "exact" (`CONTEXT`, in a record field) answered with the most likely rendering. Read with the instruction,
the base model is sure; without it, it spreads over the three. The student is the base model itself and never sees
the instruction; its teacher is the frozen base model (`teacher_model: self`) that reads it before each prompt
(`teacher_context_key: hint`), so distilling teaches the student to answer as if told "exact".

The table: KL(teacher with the context ‖ student without it) per response token on held-out prompts (the trainer's
own evaluation, teacher-forced on drawn renderings), before and after self-distillation, off-policy (the data's
responses) and on-policy (the student's own, every micro-batch), and the share of held-out prompts whose greedy
answer without the context is the most likely rendering. The goal: the KL halved or better, both ways.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsdp_kd.config import TrainConfig  # noqa: E402
from fsdp_kd.distributed import init_distributed, seed_everything, teardown  # noqa: E402
from fsdp_kd.privileged import CONTEXT_SEPARATOR  # noqa: E402
from fsdp_kd.testing.tiny import (RENDERING_PROBS, SOURCE_LETTERS, build_char_tokenizer, build_tiny_model,  # noqa: E402
                                  rendering_table, write_jsonl)
from fsdp_kd.trainer import Trainer  # noqa: E402

CONTEXT = "exact"  # the instruction only the teacher reads
BASE = (128, 3)  # (width, layers) of the base model, which is also the student


def task(seed: int, n_train: int, n_eval: int, word_len: int = 6) -> dict[str, list[dict]]:
    """The records: `base` (bare prompts with drawn renderings, and prompts after the instruction with the most
    likely one), `train` and `eval` (bare prompts with drawn renderings, the instruction in `hint`), `mode` (held-out
    prompts with the most likely rendering)."""
    rng = random.Random(seed)
    table = rendering_table(rng)
    words = ["".join(rng.choice(SOURCE_LETTERS) for _ in range(word_len)) for _ in range(n_train + n_eval)]

    def render(word: str, drawn: bool) -> str:
        options = [table[(prev, cur)] for prev, cur in zip(" " + word, word)]
        return "".join(rng.choices(o, RENDERING_PROBS)[0] if drawn else o[0] for o in options)

    train, held_out = words[:n_train], words[n_train:]
    return {"base": [r for w in train for r in ({"input": f"{w}:", "output": render(w, True)},
                                                 {"input": f"{CONTEXT}{CONTEXT_SEPARATOR}{w}:", "output": render(w, False)})],
            "train": [{"input": f"{w}:", "output": render(w, True), "hint": CONTEXT} for w in train],
            "eval": [{"input": f"{w}:", "output": render(w, True), "hint": CONTEXT} for w in held_out],
            "mode": [{"input": f"{w}:", "output": render(w, False)} for w in held_out]}


@torch.no_grad()
def exact_match(model_dir: str, records: list[dict]) -> float:
    """The share of prompts whose greedy answer, without the context, is the most likely rendering."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = torch.tensor([tok(r["input"])["input_ids"] for r in records])  # one length: no padding
    out = model.generate(prompts, max_new_tokens=len(records[0]["output"]), do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    answers = tok.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)
    return sum(a == r["output"] for a, r in zip(answers, records)) / len(records)


def kl_to_teacher(cfg: TrainConfig, model_dir: str, env, out: str) -> float:
    """KL(teacher with the context ‖ model_dir without it) per token on the held-out data: one evaluation pass."""
    probe = dataclasses.replace(cfg, pretrain=model_dir, on_policy_ratio=0.0, kd_coef=0.5, kd_loss="forward_kl",
                                save_path=os.path.join(out, "scoring", os.path.basename(model_dir)))
    seed_everything(cfg.seed, env.rank)
    return Trainer(probe, env).evaluate()["eval_kl"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working directory (data, models); must not hold a finished run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base_steps", type=int, default=300, help="steps that teach the base model the task")
    parser.add_argument("--steps", type=int, default=60, help="self-distillation steps, each way")
    args = parser.parse_args(argv)
    env = init_distributed()
    data = os.path.join(args.out, "data")
    if env.is_main:
        os.makedirs(data, exist_ok=True)
        tok = build_char_tokenizer(os.path.join(args.out, "base_init"))
        build_tiny_model(os.path.join(args.out, "base_init"), len(tok), *BASE, seed=args.seed, init_std=0.05)
        for name, records in task(args.seed, 4000, 200).items():
            write_jsonl(os.path.join(data, f"{name}.jsonl"), records)
    torch.distributed.barrier()
    common = dict(max_len=48, micro_train_batch_size=max(1, 64 // env.world_size), train_batch_size=64,
                  learning_rate=3e-3, lr_warmup_ratio=0.05, adam_betas=(0.9, 0.98), max_epochs=100,
                  logging_steps=20, param_dtype="fp32", kd_vocab_chunk=64, kd_token_chunk=512,
                  data_cache_dir=os.path.join(args.out, "tokenized"), seed=TrainConfig.seed + args.seed)
    base_dir = os.path.join(args.out, "base")
    base = TrainConfig(pretrain=os.path.join(args.out, "base_init"), dataset=os.path.join(data, "base.jsonl"),
                       kd_coef=0.0, max_steps=args.base_steps, save_path=base_dir, **common)
    seed_everything(base.seed, env.rank)
    Trainer(base, env).train()
    distill = TrainConfig(pretrain=base_dir, teacher_model="self", teacher_context_key="hint",
                          dataset=os.path.join(data, "train.jsonl"), eval_dataset=os.path.join(data, "eval.jsonl"),
                          kd_coef=1.0, kd_loss="forward_kl", max_steps=args.steps, **{**common, "learning_rate": 1e-3})
    runs = {"off-policy (the data's responses)": dataclasses.replace(
                distill, save_path=os.path.join(args.out, "off_policy")),
            "on-policy (the student's own, λ = 1)": dataclasses.replace(
                distill, on_policy_ratio=1.0, generate_max_new_tokens=8, save_path=os.path.join(args.out, "on_policy"))}
    with open(os.path.join(data, "mode.jsonl")) as f:
        mode_records = [json.loads(line) for line in f]
    before = kl_to_teacher(distill, base_dir, env, args.out)
    rows = []
    for name, cfg in runs.items():
        seed_everything(cfg.seed, env.rank)
        Trainer(cfg, env).train()
        after = kl_to_teacher(distill, cfg.save_path, env, args.out)
        if env.is_main:
            rows.append((name, before, after, exact_match(base_dir, mode_records),
                         exact_match(cfg.save_path, mode_records)))
    if env.is_main:
        print("\n| self-distillation | KL(teacher+context ‖ student) before | after | after / before | exact match "
              "without the context, before → after |")
        print("|---|---|---|---|---|")
        for name, b, a, em_b, em_a in rows:
            print(f"| {name} | {b:.4f} | {a:.4f} | {a / b:.4f} | {em_b:.1%} → {em_a:.1%} |")
        ratios = ", ".join(f"{a / b:.4f} ({name.split()[0]})" for name, b, a, *_ in rows)
        print(f"\nself-distillation: KL after / before = {ratios} (goal <= 0.5)")
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
