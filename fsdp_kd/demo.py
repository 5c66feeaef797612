"""The built-in demo: a real distillation on a laptop CPU, with no downloads, in a few minutes.

It builds a character tokenizer and a toy translation task, trains a teacher on it (the trainer with no teacher is
plain SFT), distils the teacher into a smaller student three ways (off-policy; from a top-k cache of the teacher,
k = 8, built once, no teacher loaded while training; on-policy for half the micro-batches), trains the same student
with CE only on the same budget, and prints a table: eval CE, KL to the teacher (the full KL, against the live
teacher, for every model), the same KL on the teacher's top-8 tokens plus a rest bucket (all that the cache stores),
exact-match accuracy of greedy answers, and the KL to the teacher on each model's own greedy output.

The task is a toy translation whose renderings are ambiguous (see `translation_task`): a sampled label shows one
rendering, the teacher's distribution shows all of them with their odds, which is what distillation passes on.

    torchrun --nproc_per_node 2 train.py          # runs this
    torchrun --nproc_per_node 2 -m fsdp_kd.demo --out demo_out
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import sys

import torch

from .stages import Stages
from .testing.tiny import build_char_tokenizer, build_tiny_model, read_jsonl, translation_task, write_jsonl

CACHED = "KD student, top-k cache (k = 8)"
ON_POLICY = "KD student, on-policy (λ = 0.5)"
PAIR_CE = "CE-only student, its own tokenizer"
PAIR_KD = "KD student, its own tokenizer (cross-tokenizer)"
PAIRS = 24  # letter pairs the second tokenizer adds


TEACHER, STUDENT = (160, 3), (64, 2)  # (width, layers): 0.95M and 0.11M parameters
# the standard deviation of every demo model's initial weights: transformers' default, 0.02, leaves models this small
# on a plateau of the loss for their first hundred or so steps
INIT_STD = 0.05
TEACHER_STEPS, STUDENT_STEPS = 200, 250


@torch.no_grad()
def scores_against_teacher(model_dir: str, teacher_dir: str, mode_records: list[dict], eval_records: list[dict],
                           k: int = 8) -> tuple[float, float, float]:
    """(exact match, KL(teacher‖model) per token on the model's own greedy output, KL on the teacher's top-k
    buckets), with the exported HF models loaded the way users load them.

    Exact match compares the greedy answer with the most likely rendering (`mode_records`). The own-output KL is
    taken where the model writes on its own, the contexts an on-policy student trains on. The bucketed KL is taken
    teacher-forced on the held-out samples (`eval_records`, where the eval KL is measured) between the teacher's
    top-k tokens plus one bucket for the rest, which is all a top-k cache tells a student: the rest of the full KL
    is how the tail mass is spread, which the cache cannot teach."""
    from torch.nn.functional import kl_div
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()

    def log_probs(lm, ids):
        return torch.log_softmax(lm(ids).logits.double(), -1)

    hits, own_kl, own_tokens = 0, 0.0, 0
    for group, start, out in _greedy(model, tok, mode_records):
        log_q_all, log_p_all = log_probs(model, out), log_probs(teacher, out)
        for i, r in enumerate(group):
            generated = out[i, start:].tolist()
            n = generated.index(tok.eos_token_id) + 1 if tok.eos_token_id in generated else len(generated)
            hits += tok.decode(generated[:n], skip_special_tokens=True) == r["output"]
            rows = slice(start - 1, start - 1 + n)  # the positions that predicted this answer's tokens
            own_kl += float(kl_div(log_q_all[i, rows], log_p_all[i, rows], reduction="sum", log_target=True))
            own_tokens += n
    bucketed_kl, tokens = 0.0, 0
    for group in _same_length(eval_records, lambda r: (len(tok(r["input"])["input_ids"]),
                                                       len(tok(r["input"] + r["output"])["input_ids"]))):
        prompt_len = len(tok(group[0]["input"])["input_ids"])
        ids = torch.tensor([tok(r["input"] + r["output"])["input_ids"] + [tok.eos_token_id] for r in group])
        rows = slice(prompt_len - 1, ids.shape[1] - 1)  # the response and its end, as the trainer scores them
        log_q, log_p = log_probs(model, ids)[:, rows], log_probs(teacher, ids)[:, rows]
        top = log_p.topk(k, -1).indices
        bucketed_kl += float(kl_div(bucketed(log_q, top), bucketed(log_p, top), reduction="sum", log_target=True))
        tokens += log_q.shape[0] * log_q.shape[1]
    return hits / len(mode_records), own_kl / max(own_tokens, 1), bucketed_kl / max(tokens, 1)


def _greedy(model, tok, records: list[dict]):
    """Per batch of records whose prompts and answers have one length: (the batch, the prompt length, the greedy
    output ids), with room for one token more than the expected answer has characters (its end)."""
    for group in _same_length(records, lambda r: (len(tok(r["input"])["input_ids"]), len(r["output"]))):
        prompts = torch.tensor([tok(r["input"])["input_ids"] for r in group])
        yield group, prompts.shape[1], model.generate(prompts, max_new_tokens=len(group[0]["output"]) + 1,
                                                      do_sample=False, pad_token_id=tok.pad_token_id,
                                                      eos_token_id=tok.eos_token_id)


def _same_length(records: list, length) -> list[list]:
    """The records grouped by `length(record)`, so each group runs as one batch with no padding."""
    groups: dict = {}
    for r in records:
        groups.setdefault(length(r), []).append(r)
    return list(groups.values())


def bucketed(log_probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[rows, k + 1] log-probabilities: the tokens `top`, then one bucket holding the rest of the mass."""
    picked = log_probs.gather(-1, top)
    return torch.cat([picked, torch.log1p(-picked.exp().sum(-1, keepdim=True).clamp(max=1.0))], -1)


def _plot_students(runs: dict, out_dir: str) -> str:
    """Where the KD and CE-only students' training curves went, or why there are none."""
    try:
        from .plot import plot_runs
    except ImportError:
        return 'curves.png skipped: matplotlib is not installed (pip install -e ".[plot]")'
    path = plot_runs([runs["KD student"].save_path, runs["CE-only student"].save_path],
                     ["KD student", "CE-only student"], os.path.join(out_dir, "curves.png"))
    return f"{os.path.basename(path):<22} training curves of the KD and CE-only students"


def prepare_task(out: str, seed: int, train_samples: int, env, stages: Stages) -> dict[str, str]:
    """The task's data, the tokenizer and the initial models under `out` (rank 0 writes, every rank waits): the
    teacher and the student over the character tokenizer, and the same student over a second tokenizer (the
    characters and the training responses' `PAIRS` most frequent letter pairs). Returns their paths."""
    paths = {k: os.path.join(out, k) for k in ("tokenizer", "teacher_init", "student_init", "pair_student_init",
                                               "data")}
    with stages.run("task, tokenizers and initial models", "setup"):
        if env.is_main:
            os.makedirs(paths["data"], exist_ok=True)
            tok = build_char_tokenizer(paths["tokenizer"])
            for name, (hidden, layers), offset in (("teacher_init", TEACHER, 1), ("student_init", STUDENT, 2)):
                build_tiny_model(paths[name], len(tok), hidden, layers, seed=seed + offset, init_std=INIT_STD)
                tok.save_pretrained(paths[name])
            train, *held_out = translation_task(seed, train_samples, 200)
            for name, records in zip(("train", "eval", "eval_mode"), (train, *held_out)):
                write_jsonl(os.path.join(paths["data"], f"{name}.jsonl"), records)
            pair_tok = build_char_tokenizer(paths["pair_student_init"], pairs=frequent_pairs(train, PAIRS))
            build_tiny_model(paths["pair_student_init"], len(pair_tok), *STUDENT, seed=seed + 2, init_std=INIT_STD)
        torch.distributed.barrier()
    return paths


def frequent_pairs(records: list[dict], n: int) -> tuple[str, ...]:
    """The n most frequent adjacent letter pairs of the responses."""
    counts = collections.Counter(r["output"][i:i + 2] for r in records for i in range(len(r["output"]) - 1))
    return tuple(pair for pair, _ in counts.most_common(n))


@torch.no_grad()
def aligned_scores(model_dir: str, teacher_dir: str, paths: dict[str, str]) -> tuple[float, float, float]:
    """(KL(teacher‖model) per aligned response token, the share of response tokens aligned, exact match) of an
    exported model whose tokenizer may differ from the teacher's, on the held-out samples.

    At each response position where the two tokenizations align one token to one (`cross_tokenizer.Alignment`), the
    KL is taken between the teacher's distribution and the model's over the shared tokens plus one bucket for its
    own others (here its pair tokens: the teacher's vocabulary is all shared, so the teacher's side is whole). With
    the teacher's own tokenizer every position aligns and this is the full KL. Exact match decodes the greedy answer
    to text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .cross_tokenizer import TeacherTokenization, TokenBytes, shared_vocabulary

    s_tok, t_tok = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s_bytes, t_bytes = TokenBytes.of(s_tok), TokenBytes.of(t_tok)
    shared = shared_vocabulary(s_bytes, t_bytes)
    s_ids, t_ids = torch.from_numpy(shared.student_ids), torch.from_numpy(shared.teacher_ids)
    s_other, t_other = torch.ones(len(s_tok), dtype=torch.bool), torch.ones(len(t_tok), dtype=torch.bool)
    s_other[s_ids], t_other[t_ids] = False, False
    retokenize = TeacherTokenization(s_bytes, t_bytes, t_tok)
    samples = []  # (student ids, prompt length, teacher ids, teacher position of each student position)
    for r in read_jsonl(os.path.join(paths["data"], "eval.jsonl")):
        ids = s_tok(r["input"] + r["output"])["input_ids"] + [s_tok.eos_token_id]
        fields = retokenize.fields(ids)
        samples.append((ids, len(s_tok(r["input"])["input_ids"]), fields["teacher_ids"],
                        torch.tensor(fields["teacher_positions"])))
    kl = aligned = trained = 0
    for group in _same_length(samples, lambda sample: (len(sample[0]), len(sample[2]))):
        log_q = torch.log_softmax(model(torch.tensor([g[0] for g in group])).logits[..., :len(s_tok)].double(), -1)
        log_p = torch.log_softmax(teacher(torch.tensor([g[2] for g in group])).logits[..., :len(t_tok)].double(), -1)
        for i, (ids, prompt, _, at) in enumerate(group):
            rows = torch.arange(prompt - 1, len(ids) - 1)  # the response and its end, as training scores them
            trained += len(rows)
            rows = rows[at[rows] >= 0]
            aligned += len(rows)
            q_rows, p_rows = log_q[i, rows], log_p[i, at[rows]]
            q_buckets = torch.cat([q_rows[:, s_ids], torch.logsumexp(q_rows[:, s_other], -1, keepdim=True)], -1)
            p_buckets = torch.cat([p_rows[:, t_ids], torch.logsumexp(p_rows[:, t_other], -1, keepdim=True)], -1)
            mass = p_buckets.exp()  # an empty bucket (the teacher's rest, here) adds nothing
            kl += float(torch.where(mass > 0, mass * (p_buckets - q_buckets), 0.0).sum())
    mode = read_jsonl(os.path.join(paths["data"], "eval_mode.jsonl"))
    hits = sum(s_tok.decode(row[start:], skip_special_tokens=True) == r["output"]
               for group, start, out in _greedy(model, s_tok, mode) for r, row in zip(group, out))
    return kl / max(aligned, 1), aligned / max(trained, 1), hits / len(mode)


def base_config(out: str, paths: dict[str, str], world_size: int, seed: int):
    """The settings every demo training shares: the data, batch 64, AdamW at 3e-3, fp32, a log line and an
    evaluation every 40 steps, and a loss kernel sized for the tiny vocabulary."""
    from .config import TrainConfig

    return TrainConfig(dataset=os.path.join(paths["data"], "train.jsonl"),
                       eval_dataset=os.path.join(paths["data"], "eval.jsonl"), max_len=32,
                       micro_train_batch_size=max(1, 64 // world_size), train_batch_size=64,
                       learning_rate=3e-3, lr_warmup_ratio=0.05, adam_betas=(0.9, 0.98), max_epochs=100,
                       logging_steps=40, eval_steps=40, param_dtype="fp32", kd_vocab_chunk=64,
                       kd_token_chunk=512, data_cache_dir=os.path.join(out, "tokenized"),
                       seed=TrainConfig.seed + seed)


def train_stage(name: str, cfg, env, stages: Stages) -> dict:
    """One training as a stage of the recipe; returns the trainer's summary."""
    from .config import validate
    from .distributed import seed_everything
    from .trainer import Trainer

    validate(cfg)
    with stages.run(name, os.path.basename(cfg.save_path)) as stage:
        seed_everything(cfg.seed, env.rank)
        summary = Trainer(cfg, env).train(on_step=stage.update)
        stage.result = f"eval CE {summary['final_eval']['eval_ce_loss']:.4f}"
    return summary


def teacher_eval(cfg, teacher_dir: str, out: str, env) -> dict:
    """Eval CE and KL to the live teacher of a trained model, from one evaluation pass of the trainer (every rank
    takes part): the demo's common footing for every model, whatever it trained on."""
    from .distributed import seed_everything
    from .trainer import Trainer

    probe = dataclasses.replace(cfg, pretrain=cfg.save_path, teacher_model=teacher_dir, teacher_cache=None,
                                on_policy_ratio=0.0, kd_coef=0.5, kd_loss="forward_kl", kd_temperature=1.0,
                                save_path=os.path.join(out, "scoring", os.path.basename(cfg.save_path)))
    seed_everything(cfg.seed, env.rank)
    return Trainer(probe, env).evaluate()


def spread_over_ranks(jobs: dict, env, on_done) -> dict:
    """{key: job()} for jobs that each run on one rank (round robin over the ranks), gathered on every rank;
    `on_done(done, total)` as this rank passes each job."""
    from .distributed import all_gather_object

    mine = {}
    for i, (key, job) in enumerate(jobs.items()):
        if i % env.world_size == env.rank:
            mine[key] = job()
        on_done(i + 1, len(jobs))
    return {key: value for part in all_gather_object(mine) for key, value in part.items()}


def main(argv: list[str] | None = None) -> int:
    from .usage import asks_for_help, parser_sections, print_help, render

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fsdp_kd.demo", add_help=False)
    parser.add_argument("--out", default="demo_out", help="the working directory: data, models, the table and the "
                                                          "curves (must not hold a finished demo)")
    parser.add_argument("--teacher_steps", type=int, default=TEACHER_STEPS,
                        help="optimizer steps that train the teacher")
    parser.add_argument("--student_steps", type=int, default=STUDENT_STEPS,
                        help="optimizer steps that train each student (live KD, cached, on-policy, CE-only)")
    parser.add_argument("--train_samples", type=int, default=4000, help="training samples of the toy translation task")
    parser.add_argument("--seed", type=int, default=0,
                        help="shifts every seed (task, initial weights, training); rerun with others to see the spread")
    if asks_for_help(argv):
        return print_help(render(
            "torchrun --nproc_per_node 2 -m fsdp_kd.demo [--out DIR] [--seed S] [--option value ...]",
            "Runs the built-in demo: trains a teacher on a toy translation task, distils it into a 9x smaller student "
            "three ways (live teacher, top-k cache, on-policy) and compares them with a CE-only student in a table.",
            parser_sections(parser, "Options")))
    args = parser.parse_args(argv)

    from .cache_teacher import CacheBuilder
    from .distributed import init_distributed, teardown

    if os.path.exists(os.path.join(args.out, "table.md")):
        print(f"error: {args.out} already holds a finished demo; pass --out NEW_DIR", file=sys.stderr)
        return 2
    env = init_distributed()
    # the task and models, seven trainings, the teacher cache and the scoring
    stages = Stages(10, os.path.join(args.out, "logs"), shown=env.is_main)
    if env.is_main:
        print("fsdp-kd demo: a {}-wide, {}-layer teacher distilled into a {}-wide, {}-layer student on a toy "
              "translation task ({} ranks, {}); each stage's log is in {}".format(
                  *TEACHER, *STUDENT, env.world_size, env.device.type, stages.log_dir), flush=True)
    paths = prepare_task(args.out, args.seed, args.train_samples, env, stages)
    base = base_config(args.out, paths, env.world_size, args.seed)
    teacher_dir = os.path.join(args.out, "teacher")
    runs = {
        "teacher": dataclasses.replace(base, pretrain=paths["teacher_init"], kd_coef=0.0,
                                       max_steps=args.teacher_steps, save_path=teacher_dir),
        "KD student": dataclasses.replace(base, pretrain=paths["student_init"], kd_coef=0.9, teacher_model=teacher_dir,
                                          max_steps=args.student_steps, save_path=os.path.join(args.out, "kd_student")),
        CACHED: dataclasses.replace(base, pretrain=paths["student_init"], kd_coef=0.9, max_steps=args.student_steps,
                                    teacher_cache=os.path.join(args.out, "teacher_cache"), cache_k=8,
                                    save_path=os.path.join(args.out, "kd_cache_student")),
        ON_POLICY: dataclasses.replace(base, pretrain=paths["student_init"], kd_coef=0.9, max_steps=args.student_steps,
                                       on_policy_ratio=0.5, generate_max_new_tokens=8, teacher_model=teacher_dir,
                                       save_path=os.path.join(args.out, "kd_on_policy_student")),
        "CE-only student": dataclasses.replace(base, pretrain=paths["student_init"], kd_coef=0.0,
                                               max_steps=args.student_steps,
                                               save_path=os.path.join(args.out, "ce_student")),
        # the same student over a second tokenizer (letter pairs as tokens): CE only, and taught across tokenizers
        PAIR_CE: dataclasses.replace(base, pretrain=paths["pair_student_init"], kd_coef=0.0,
                                     max_steps=args.student_steps, save_path=os.path.join(args.out, "ce_pair_student")),
        PAIR_KD: dataclasses.replace(base, pretrain=paths["pair_student_init"], kd_coef=0.9, teacher_model=teacher_dir,
                                     cross_tokenizer=True, max_steps=args.student_steps,
                                     save_path=os.path.join(args.out, "kd_pair_student")),
    }
    same_tokenizer = [name for name in runs if name not in (PAIR_CE, PAIR_KD)]
    across = ["CE-only student", "KD student", PAIR_CE, PAIR_KD]
    results = {}
    try:
        for name, cfg in runs.items():
            if name == CACHED:  # run the teacher once over the data, then train with no teacher loaded
                with stages.run(f"teacher cache (top-k, k = {cfg.cache_k})", "teacher_cache"):
                    CacheBuilder(dataclasses.replace(cfg, teacher_model=teacher_dir), env).run()
            train_stage(name, cfg, env, stages)
        with stages.run("scoring every model", "scoring") as stage:
            for name in same_tokenizer:
                results[name] = teacher_eval(runs[name], teacher_dir, args.out, env)
            mode_records, eval_records = (read_jsonl(os.path.join(paths["data"], f"{part}.jsonl"))
                                          for part in ("eval_mode", "eval"))
            jobs = {(name, "scores"): functools.partial(scores_against_teacher, runs[name].save_path, teacher_dir,
                                                        mode_records, eval_records, runs[CACHED].cache_k)
                    for name in same_tokenizer}
            jobs.update({(name, "aligned"): functools.partial(aligned_scores, runs[name].save_path, teacher_dir, paths)
                         for name in across})
            for (name, kind), value in spread_over_ranks(jobs, env, stage.update).items():
                results.setdefault(name, {})[kind] = value
    finally:
        teardown()
    if env.is_main:
        k = runs[CACHED].cache_k
        rows = [f"| model | eval CE | KL(teacher‖model) | KL on the teacher's top-{k} + rest | exact match | "
                "KL on its own greedy output |", "|---|---|---|---|---|---|"]
        for name in same_tokenizer:
            acc, own_kl, bucketed_kl = results[name]["scores"]
            rows.append(f"| {name} | {results[name]['eval_ce_loss']:.4f} | {results[name]['eval_kl']:.5f} | "
                        f"{bucketed_kl:.5f} | {acc:.1%} | {own_kl:.5f} |")
        rows += ["", f"Across tokenizers: the student's own tokenizer adds the {PAIRS} most frequent letter pairs of the "
                 "responses as tokens", "", "| student | KL(teacher‖student) per aligned token | response tokens "
                 "aligned one to one | exact match |", "|---|---|---|---|"]
        for name in across:
            kl, share, acc = results[name]["aligned"]
            rows.append(f"| {name} | {kl:.5f} | {share:.1%} | {acc:.1%} |")
        table = "\n".join(rows)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        print("\n" + table + "\n")
        print(f"outputs in {args.out}/:\n"
              f"  {os.path.basename(runs['KD student'].save_path) + '/':<22} the KD student as an HF model "
              "(AutoModelForCausalLM.from_pretrained); every run's folder holds its model, train_config.yaml and "
              "metrics.jsonl\n"
              f"  {'table.md':<22} the table above\n"
              f"  {_plot_students(runs, args.out)}\n"
              f"  {'logs/':<22} each stage's full output\n"
              "a real run: torchrun --nproc_per_node N train.py --pretrain STUDENT --teacher_model TEACHER "
              "--dataset DATA.jsonl (python train.py --help lists every key)")
    return 0


if __name__ == "__main__":
    from .distributed import exit_process

    exit_process(main())
