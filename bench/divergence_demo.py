"""Every divergence on the demo's task, on the same budget: the table in docs/divergences.md; and, with
`--cross_tokenizer`, a student with its own tokenizer taught across tokenizers: the table in docs/cross_tokenizer.md.

Per seed it builds the demo's task and teacher (`fsdp_kd.demo`), then trains the demo's student once per divergence
with a live teacher (off-policy, kd_coef 0.9, τ = 1, each divergence at its default parameter, the same steps as the
demo's students), and once with CE only. Every model is scored as the demo scores it: KL(teacher‖model) on the
held-out samples (teacher-forced, whole vocabulary, τ = 1), and exact match of greedy answers. It prints the table
(mean ± standard deviation over the seeds, and each seed's values).

    torchrun --nproc_per_node 2 bench/divergence_demo.py --out /tmp/div_demo --seeds 0 1 2

Only the KD students' divergence differs between rows: the scoring is the same for all, so the rows compare what
each divergence teaches, in the units of the demo's table.

    torchrun --nproc_per_node 2 bench/divergence_demo.py --cross_tokenizer --out /tmp/xtok_demo --seeds 0 1 2

trains four students instead, forward KL where there is a teacher: the character-tokenizer student with CE only and
with KD, and the same student over the demo's second tokenizer (the characters plus the 24 most frequent letter pairs
of the responses, `demo.prepare_task`) with CE only and with cross-tokenizer KD (`cross_tokenizer: true`, ULD weight
1). All four are scored by `demo.aligned_scores`: KL(teacher‖model) per response token where the tokenizations align
one to one (the full KL for the character students, where every token aligns), the share of such tokens, and exact
match decoded to text, and by KL(q*‖student) per response position (`exact_translation_kl.py`: against the
teacher's exact translation into each student's tokens, the like-for-like KL across tokenizers). `--prefix_buckets`,
`--uld_weight` and `--span_weight` set those keys for the cross-tokenizer KD student.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


CE_ONLY = "CE only"
CROSS_ROWS = ("char tokenizer, CE only", "char tokenizer, KD", "pair tokenizer, CE only",
              "pair tokenizer, cross-tokenizer KD")


def student_flags(row: str, paths: dict[str, str], teacher_dir: str, cross: dict) -> dict:
    """A row's student: its initial model and its loss (`cross`: the cross-tokenizer student's keys)."""
    teacher = {"kd_coef": 0.9, "teacher_model": teacher_dir}
    return {CE_ONLY: {"kd_coef": 0.0}, CROSS_ROWS[0]: {"kd_coef": 0.0}, CROSS_ROWS[1]: teacher,
            CROSS_ROWS[2]: {"pretrain": paths["pair_student_init"], "kd_coef": 0.0},
            CROSS_ROWS[3]: {"pretrain": paths["pair_student_init"], "cross_tokenizer": True, **teacher, **cross},
            }.get(row, {**teacher, "kd_loss": row})


def main() -> int:
    from fsdp_kd.demo import (STUDENT_STEPS, TEACHER_STEPS, aligned_scores, base_config, prepare_task,
                              scores_against_teacher, teacher_eval, train_stage)
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.divergences import DIVERGENCES
    from fsdp_kd.stages import Stages
    from fsdp_kd.testing.tiny import read_jsonl

    from exact_translation_kl import score

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher_steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--student_steps", type=int, default=STUDENT_STEPS)
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES))
    parser.add_argument("--cross_tokenizer", action="store_true", help="the four rows of the cross-tokenizer table")
    parser.add_argument("--prefix_buckets", action="store_true", help="the cross-tokenizer KD student's prefix_buckets")
    parser.add_argument("--uld_weight", type=float, default=1.0, help="the cross-tokenizer KD student's uld_weight")
    parser.add_argument("--span_weight", type=float, default=1.0, help="the cross-tokenizer KD student's span_weight")
    args = parser.parse_args()
    env = init_distributed()
    rows = list(CROSS_ROWS) if args.cross_tokenizer else [CE_ONLY] + args.divergences
    scores: dict[str, list[tuple[float, ...]]] = {row: [] for row in rows}
    try:
        for seed in args.seeds:
            out = os.path.join(args.out, f"seed{seed}")
            stages = Stages(2 + len(rows), os.path.join(out, "logs"), shown=env.is_main)
            paths = prepare_task(out, seed, 4000, env, stages)
            base = base_config(out, paths, env.world_size, seed)
            teacher_dir = os.path.join(out, "teacher")
            train_stage(f"seed {seed}: teacher", dataclasses.replace(
                base, pretrain=paths["teacher_init"], kd_coef=0.0, max_steps=args.teacher_steps,
                save_path=teacher_dir), env, stages)
            for i, row in enumerate(rows):
                cfg = dataclasses.replace(base, pretrain=paths["student_init"], max_steps=args.student_steps,
                                          save_path=os.path.join(out, f"row{i}"))
                cross = {"prefix_buckets": args.prefix_buckets, "uld_weight": args.uld_weight,
                         "span_weight": args.span_weight}
                cfg = dataclasses.replace(cfg, **student_flags(row, paths, teacher_dir, cross))
                train_stage(f"seed {seed}: {row}", cfg, env, stages)
                if args.cross_tokenizer:
                    if env.is_main:  # (KL per aligned token, share aligned, exact match)
                        exact = score(cfg.save_path, teacher_dir, os.path.join(paths["data"], "eval.jsonl"))
                        scores[row].append((*aligned_scores(cfg.save_path, teacher_dir, paths),
                                            exact["KL(q*‖q) per position"]))
                    torch.distributed.barrier()
                else:
                    kl = teacher_eval(cfg, teacher_dir, out, env)["eval_kl"]
                    if env.is_main:  # (KL, exact match)
                        mode_records, eval_records = (read_jsonl(os.path.join(paths["data"], f"{part}.jsonl"))
                                                      for part in ("eval_mode", "eval"))
                        exact = scores_against_teacher(cfg.save_path, teacher_dir, mode_records, eval_records)[0]
                        scores[row].append((kl, exact))
                if env.is_main:
                    print(f"  seed {seed} {row}: {', '.join(f'{v:.4f}' for v in scores[row][-1])}", flush=True)
    finally:
        teardown()
    if env.is_main:
        print(f"\n{args.student_steps} student steps, seeds {args.seeds}; mean ± sd (per seed)")
        if args.cross_tokenizer:
            print("| student | KL(teacher‖student) per aligned token | response tokens aligned | exact match | "
                  "KL(q*‖student) per response position |\n|---|---|---|---|---|")
        else:
            print("| student | KL(teacher‖student) | exact match |\n|---|---|---|")
        for row in rows:
            kl, *rest = zip(*scores[row])
            aligned = f" {100 * statistics.mean(rest[0]):.1f}% |" if args.cross_tokenizer else ""
            em = rest[1] if args.cross_tokenizer else rest[0]
            exact = f" {_mean_sd(rest[2], '.4f')} ({', '.join(f'{v:.4f}' for v in rest[2])}) |" \
                if args.cross_tokenizer else ""
            print(f"| {row} | {_mean_sd(kl, '.4f')} ({', '.join(f'{v:.4f}' for v in kl)}) |{aligned} "
                  f"{_mean_sd([100 * v for v in em], '.1f')}% ({', '.join(f'{100 * v:.1f}' for v in em)}) |{exact}")
    return 0


def _mean_sd(values, fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


if __name__ == "__main__":
    from fsdp_kd.distributed import exit_process

    exit_process(main())
