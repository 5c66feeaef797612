"""Two domains, two specialists: does a student routed to each domain's teacher learn each domain as well as a
student distilled from that domain's specialist alone, and better than any one teacher on both?

The demo's toy translation task (`fsdp_kd.demo`, `testing.tiny.translation_task`) in two domains, each its own
rendering table (its own seed) over its own source letters (a-h or i-p), and its prompt ending with its own mark
(`:` or `=`). Each domain has inputs of its own, as math and code do: were the two domains' words of one alphabet,
told apart by the mark alone, a teacher would answer the other domain's prompts with its own domain's table, and the
student distilled from it alone would train on its teacher's domain twice over (the union's every record), a lesson
no real specialist gives on another domain's prompts. Two teachers of the demo's size are each trained (SFT) on one
domain only. The same student is then trained on both domains, four ways, on the same budget: routed (`teachers`,
`dataset_teachers a,b`: each domain's source to its own teacher), distilled from teacher A alone, from teacher B
alone, and CE only. Each student is scored on each domain's held-out records against that domain's teacher
(KL(teacher‖student) per token, one evaluation pass of the trainer), and on the union (the two domains' KLs weighted
by their tokens). The goal (issue 34): on each domain the routed student within 1.2× the KL of the student distilled
from that domain's specialist alone, and on the union below every single-teacher student.

    python bench/several_teachers.py --out /tmp/several --seeds 0,1,2   # prints the table of docs/several_teachers.md

Each seed's scores are saved under --out (`seed_<n>/scores.json`, with the budget that made them): the seeds may run
as processes of their own side by side (`--seeds 1`, ...), and a run over all of them then reads them back and
prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys


from fsdp_kd.demo import INIT_STD, STUDENT, TEACHER, base_config
from fsdp_kd.distributed import init_distributed, seed_everything, teardown
from fsdp_kd.testing.tiny import SOURCE_LETTERS, build_char_tokenizer, build_tiny_model, translation_task, write_jsonl
from fsdp_kd.trainer import Trainer

# each domain's words of its own source letters, and its prompt ending with its own mark
DOMAINS = {"a": (SOURCE_LETTERS, ":"), "b": ("ijklmnop", "=")}
STUDENTS = ("routed (a→A, b→B)", "teacher A alone", "teacher B alone", "CE only")


def domain_data(out: str, seed: int, train_samples: int) -> dict[str, dict[str, str]]:
    """Per domain, its training and held-out records (its own rendering table, its own source letters), as JSONL
    paths."""
    paths = {}
    for k, (domain, (letters, mark)) in enumerate(DOMAINS.items()):
        train, held_out, _ = translation_task(1000 * seed + k, train_samples, 200)
        to_domain = str.maketrans(SOURCE_LETTERS, letters)
        paths[domain] = {}
        for part, records in (("train", train), ("eval", held_out)):
            paths[domain][part] = os.path.join(out, "data", f"{domain}_{part}.jsonl")
            write_jsonl(paths[domain][part], [{**r, "input": r["input"][:-1].translate(to_domain) + mark}
                                              for r in records])
    return paths


def train(cfg, env) -> None:
    seed_everything(cfg.seed, env.rank)
    Trainer(cfg, env, log=lambda *a, **k: None).train()


def kl_against(cfg, student: str, teacher: str, data: dict[str, str], env, out: str) -> tuple[float, float]:
    """(KL(teacher‖student) per token, tokens) on a domain's held-out records, from one evaluation pass."""
    probe = dataclasses.replace(cfg, pretrain=student, teacher_model=teacher, teachers=None, dataset_teachers=None,
                                dataset=data["train"], eval_dataset=data["eval"], kd_coef=0.5, kd_loss="forward_kl",
                                kd_temperature=1.0, save_path=os.path.join(out, "scoring", os.path.basename(student)))
    seed_everything(cfg.seed, env.rank)
    metrics = Trainer(probe, env, log=lambda *a, **k: None).evaluate()
    return metrics["eval_kl"], metrics["eval_tokens"]


def one_seed(out: str, seed: int, args, env) -> dict[str, dict[str, float]]:
    """Each student's KL on each domain and on the union, for one seed."""
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tok = build_char_tokenizer(os.path.join(out, "tokenizer"))
    inits = {}
    for name, (hidden, layers), offset in (("teacher_init", TEACHER, 1), ("student_init", STUDENT, 2)):
        inits[name] = os.path.join(out, name)
        build_tiny_model(inits[name], len(tok), hidden, layers, seed=seed + offset, init_std=INIT_STD)
        tok.save_pretrained(inits[name])
    data = domain_data(out, seed, args.train_samples)
    base = base_config(out, {"data": os.path.join(out, "data")}, env.world_size, seed)
    both = f"{data['a']['train']},{data['b']['train']}"
    teachers = {}
    for domain in DOMAINS:
        teachers[domain] = os.path.join(out, f"teacher_{domain}")
        train(dataclasses.replace(base, pretrain=inits["teacher_init"], kd_coef=0.0, max_steps=args.teacher_steps,
                                  dataset=data[domain]["train"], eval_dataset=None, eval_steps=-1,
                                  save_path=teachers[domain]), env)
    student = dataclasses.replace(base, pretrain=inits["student_init"], kd_coef=0.9, max_steps=args.student_steps,
                                  dataset=both, eval_dataset=None, eval_steps=-1)
    runs = {
        STUDENTS[0]: dataclasses.replace(student, teachers={d: {"teacher_model": t} for d, t in teachers.items()},
                                         dataset_teachers="a,b", save_path=os.path.join(out, "routed")),
        STUDENTS[1]: dataclasses.replace(student, teacher_model=teachers["a"], save_path=os.path.join(out, "only_a")),
        STUDENTS[2]: dataclasses.replace(student, teacher_model=teachers["b"], save_path=os.path.join(out, "only_b")),
        STUDENTS[3]: dataclasses.replace(student, kd_coef=0.0, save_path=os.path.join(out, "ce_only")),
    }
    scores = {}
    for name, cfg in runs.items():
        train(cfg, env)
        kls = {d: kl_against(base, cfg.save_path, teachers[d], data[d], env, out) for d in DOMAINS}
        tokens = sum(n for _, n in kls.values())
        scores[name] = {**{d: kl for d, (kl, _) in kls.items()},
                        "union": sum(kl * n for kl, n in kls.values()) / tokens}
    return scores


def seed_scores(out: str, seed: int, args, env) -> dict[str, dict[str, float]]:
    """One seed's scores, read back from `out`/scores.json where a run with the same budget wrote them (so the seeds
    may run as separate processes side by side, and one more run prints their table), else measured and written."""
    path, budget = os.path.join(out, "scores.json"), [args.teacher_steps, args.student_steps, args.train_samples]
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["budget"] == budget:
            return saved["scores"]
    scores = one_seed(out, seed, args, env)
    if env.is_main:
        with open(path, "w") as f:
            json.dump({"budget": budget, "scores": scores}, f)
    return scores


def table(per_seed: list[dict[str, dict[str, float]]]) -> str:
    """Mean (min-max over seeds) of each student's KL per domain and on the union, and the goal's ratios."""
    def cell(name, column):
        values = [s[name][column] for s in per_seed]
        return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"

    rows = ["| student | KL on domain a (vs teacher A) | KL on domain b (vs teacher B) | KL on the union |",
            "|---|---|---|---|"]
    rows += [f"| {name} | {cell(name, 'a')} | {cell(name, 'b')} | {cell(name, 'union')} |" for name in STUDENTS]
    routed, alone = STUDENTS[0], {"a": STUDENTS[1], "b": STUDENTS[2]}
    ratios = {d: [s[routed][d] / s[alone[d]][d] for s in per_seed] for d in DOMAINS}
    beats = [s[routed]["union"] < min(s[alone[d]]["union"] for d in DOMAINS) for s in per_seed]
    rows += ["", "Routed student's KL over the specialist-alone student's, on the specialist's domain, per seed: "
             + "; ".join(f"domain {d}: " + ", ".join(f"{r:.3f}" for r in ratios[d]) for d in DOMAINS)
             + f" (goal ≤ 1.2). Routed below every single-teacher student on the union: {sum(beats)} of "
             f"{len(beats)} seeds."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/several_teachers.py")
    parser.add_argument("--out", required=True, help="the working directory (data, models, per-seed folders)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--teacher_steps", type=int, default=200)
    parser.add_argument("--student_steps", type=int, default=250)
    parser.add_argument("--train_samples", type=int, default=2000, help="training records per domain")
    args = parser.parse_args(argv)
    env = init_distributed()
    per_seed = []
    try:
        for seed in (int(s) for s in args.seeds.split(",")):
            per_seed.append(seed_scores(os.path.join(args.out, f"seed_{seed}"), seed, args, env))
            if env.is_main:
                print(f"seed {seed}: {per_seed[-1]}", flush=True)
    finally:
        teardown()
    if env.is_main:
        print("\n" + table(per_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
