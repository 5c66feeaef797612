"""What each distillation recipe buys over SFT on real text: a real teacher, a student made from it, GSM8K.

    python bench/real_teacher.py --recipe sft            # one recipe per call: trains, scores, writes OUT/sft.json
    python bench/real_teacher.py --recipe forward_kl
    python bench/real_teacher.py --table                 # the markdown table of every JSON in OUT (OUT/table.md)

The teacher is SmolLM2-135M-Instruct (bench/real_teacher_model.py makes it; `--teacher DIR` takes any local HF model
instead); the student is its depth-pruned cut (`python -m fsdp_kd.prune --keep 6`, made once in OUT; `--student
DIR` takes any HF model with the teacher's tokenizer instead). Every recipe trains through train.py (a world of one)
for the same budget: `--steps` optimizer steps of `--seqs` GSM8K training questions with their reference answers
(chat-templated, at most `--max_len` tokens), the same questions in the same order. The cache recipes first build
their cache with `fsdp_kd.cache_teacher` (its wall time is reported apart). The recipes `init` and `teacher` train
nothing: they score the untrained student and the teacher itself, for reference.

One scoring for every student, on the first `--eval` questions of GSM8K's test split: CE on the reference answers;
KL(teacher ‖ student) on the reference answers; KL(teacher ‖ student) on the student's own greedy answers (at most
`--gen` tokens); the share of those answers that end with a stop token of the student's generation config within the
budget; training wall time and tokens per second. Means are over answer tokens.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from realdata import realdata  # noqa: E402
from real_teacher_model import DEFAULT_CACHE, TeacherUnavailable, real_teacher  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    train: dict = field(default_factory=dict)  # train.py keys on top of the common ones
    cache: dict | None = None  # cache_teacher keys: the recipe trains from a cache built with them
    teacher: bool = True  # trains against the teacher (live or cached)
    trains: bool = True  # false: scores a model as it is (`model`: the student or the teacher)
    model: str = "student"
    student: str = "cut"  # a STUDENTS entry


RECIPES = {
    "init": Recipe(trains=False),
    "teacher": Recipe(trains=False, model="teacher"),
    "sft": Recipe({"kd_coef": 0.0}, teacher=False),
    "forward_kl": Recipe({"kd_loss": "forward_kl"}),
    "reverse_kl": Recipe({"kd_loss": "reverse_kl"}),
    "jsd": Recipe({"kd_loss": "jsd"}),
    "skew_kl": Recipe({"kd_loss": "skew_kl"}),
    "topk16": Recipe({"kd_loss": "forward_kl"}, cache={"cache_mode": "topk", "cache_k": 16}),
    "topk64": Recipe({"kd_loss": "forward_kl"}, cache={"cache_mode": "topk", "cache_k": 64}),
    "hidden": Recipe({"kd_loss": "forward_kl"}, cache={"cache_mode": "hidden"}),
    "on_policy_0.5": Recipe({"kd_loss": "reverse_kl", "on_policy_ratio": 0.5}),
    "on_policy_1": Recipe({"kd_loss": "reverse_kl", "on_policy_ratio": 1.0}),
    # Across tokenizers: the same cut with its vocabulary moved to Phi-3's (bench/transplant_vocab.py), its own
    # SFT the baseline of its rows
    "xtok_init": Recipe(trains=False, student="phi3"),
    "xtok_sft": Recipe({"kd_coef": 0.0}, teacher=False, student="phi3"),
    "xtok_forward_kl": Recipe({"kd_loss": "forward_kl", "cross_tokenizer": True}, student="phi3"),
}
# The students: the teacher's depth-pruned cut, and that cut with another tokenizer (a realdata tokenizer directory)
STUDENTS = {"cut": None, "phi3": "tok_phi3_mini_instruct"}


def common_keys(args, student: str) -> dict:
    """The train.py keys every recipe shares: the same data, order, budget and optimizer."""
    return {"pretrain": student, "dataset": args.train_data, "input_key": "question",
            "output_key": "answer", "apply_chat_template": True, "max_len": args.max_len,
            "max_samples": args.steps * args.seqs, "micro_train_batch_size": args.seqs,
            "train_batch_size": args.seqs, "max_steps": args.steps, "learning_rate": args.lr,
            "param_dtype": "fp32", "seed": 0, "logging_steps": 1, "eval_steps": -1,
            "generate_max_new_tokens": args.gen, "data_cache_dir": os.path.join(args.out, "tokenized")}


def flags(keys: dict) -> list[str]:
    out = []
    for key, value in keys.items():
        out += [f"--{key}"] + ([] if value is True else [str(value)])
    return out


def run(cmd: list[str], log: str) -> float:
    """Runs `cmd` (niced) with its output in `log`; its wall time. Exits with the log's tail if it fails."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(["nice", "-n", "5", sys.executable, *cmd], stdout=f, stderr=subprocess.STDOUT,
                              cwd=REPO).returncode
    if code:
        tail = open(log).read()[-3000:]
        sys.exit(f"{tail}\nerror: {' '.join(cmd[:3])} ... failed ({code}); the whole log is {log}")
    return time.perf_counter() - start


def train(recipe: Recipe, args, teacher: str, student: str) -> tuple[str, dict]:
    """The trained student's directory and the run's figures (wall times, tokens, tokens/s)."""
    work = os.path.join(args.out, "runs", args.tag)
    os.makedirs(os.path.dirname(work), exist_ok=True)
    keys = {**common_keys(args, student), **recipe.train, "save_path": os.path.join(work, "student")}
    if args.kd_coef is not None and recipe.teacher:
        keys["kd_coef"] = args.kd_coef
    figures = {}
    if recipe.cache:
        cache_dir = os.path.join(work, "cache")
        cache_keys = {k: v for k, v in keys.items() if k not in ("save_path",)}
        figures["cache_wall_s"] = run(["-m", "fsdp_kd.cache_teacher", *flags(
            {**cache_keys, "teacher_model": teacher, "teacher_cache": cache_dir, **recipe.cache})],
            work + ".cache.log")
        keys["teacher_cache"] = cache_dir
    elif recipe.teacher:
        keys["teacher_model"] = teacher
    figures["train_wall_s"] = run(["train.py", *flags(keys)], work + ".log")
    steps = [json.loads(line) for line in open(os.path.join(keys["save_path"], "metrics.jsonl"))]
    steps = [s for s in steps if "tokens_per_sec" in s]
    figures["tokens"] = sum(s["tokens"] for s in steps)
    figures["tokens_per_s"] = figures["tokens"] / figures["train_wall_s"]
    figures["step_tokens_per_s"] = sum(s["tokens_per_sec"] for s in steps) / max(len(steps), 1)
    figures["train_keys"] = keys
    return keys["save_path"], figures


TOPK = (8, 16, 64)  # the top-k cache's sizes whose KL gap and teacher tail mass are read off the reference answers


def token_kl_ce(student, teacher, ids: list[int], positions: list[int], targets: list[int]) -> dict:
    """Sums over `positions` (which predict `targets`), one sequence at a time: KL(teacher ‖ student), the student's
    CE, and per k in TOPK the KL on the teacher's top-k + rest buckets (what a top-k cache trains on) and the
    teacher's mass past rank k."""
    x = torch.tensor([ids])
    with torch.no_grad():
        log_q = torch.log_softmax(student(x, use_cache=False).logits[0, positions].float(), -1)
        log_p = torch.log_softmax(teacher(x, use_cache=False).logits[0, positions].float(), -1)
    p = log_p.exp()
    out = {"kl": float((p * (log_p - log_q)).sum()), "kl_tokens": len(positions),
           "ce": float(-log_q.gather(1, torch.tensor(targets)[:, None]).sum())}
    top_p, top = p.topk(max(TOPK), -1)
    top_q = log_q.gather(1, top).exp()
    for k in TOPK:
        p_k, q_k = top_p[:, :k], top_q[:, :k]
        p_rest, q_rest = (1 - p_k.sum(-1)).clamp_min(1e-12), (1 - q_k.sum(-1)).clamp_min(1e-12)
        out[f"kl_buckets_k{k}"] = float((p_k * (p_k / q_k).log()).sum() + (p_rest * (p_rest / q_rest).log()).sum())
        out[f"teacher_tail_k{k}"] = float(p_rest.sum())
    return out


@dataclass
class CrossScoring:
    """Scoring a student of another tokenizer: the teacher reads each sample in its own tokens
    (`cross_tokenizer.TeacherTokenization`), and the two are compared where a student token aligns one to one with a
    teacher token, as the trainer's exact part does: KL over the tokens both vocabularies spell alike plus one rest
    bucket each (`shared`). The ULD part's top-k error is read off the same positions."""
    tokenization: object
    shared: object  # cross_tokenizer.SharedVocabulary

    @classmethod
    def of(cls, student_tokenizer, teacher_tokenizer) -> "CrossScoring | None":
        """None when the two tokenizers are one."""
        from fsdp_kd.cross_tokenizer import TeacherTokenization, TokenBytes, shared_vocabulary

        if student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
            return None
        s, t = TokenBytes.of(student_tokenizer), TokenBytes.of(teacher_tokenizer)
        return cls(TeacherTokenization(s, t, teacher_tokenizer), shared_vocabulary(s, t))


def cross_kl_ce(student, teacher, ids: list[int], positions: list[int], targets: list[int],
                cross: CrossScoring) -> dict:
    """Sums over `positions`: the student's CE; and over those of them aligned one to one with a teacher position,
    the bucket KL(teacher ‖ student) and ULD's parts: its full value (the L1 distance between the two sides' sorted
    probabilities of their unshared tokens), its value over the top k ranks, and the bound on the difference (the
    two tails' mass past rank k), per k in TOPK."""
    from fsdp_kd.cross_tokenizer import teacher_fields
    from fsdp_kd.testing.reference import shared_and_rest

    fields = teacher_fields(*cross.tokenization.columns(ids), len(ids))
    where = fields["teacher_positions"]
    with torch.no_grad():
        log_q = torch.log_softmax(student(torch.tensor([ids]), use_cache=False).logits[0, positions].float(), -1)
        teacher_ids = fields["teacher_ids"]
        log_p_all = (torch.log_softmax(teacher(torch.tensor([teacher_ids]), use_cache=False).logits[0].float(), -1)
                     if teacher_ids else None)
    out = {"ce": float(-log_q.gather(1, torch.tensor(targets)[:, None]).sum()), "kl": 0.0, "kl_tokens": 0,
           "uld_full": 0.0, **{f"uld_k{k}": 0.0 for k in TOPK}, **{f"uld_bound_k{k}": 0.0 for k in TOPK}}
    rows = [(i, where[p]) for i, p in enumerate(positions) if where[p] >= 0]
    if not rows:
        return out
    log_q, log_p = log_q[[i for i, _ in rows]], log_p_all[[j for _, j in rows]]
    s_ids, t_ids = torch.from_numpy(cross.shared.student_ids), torch.from_numpy(cross.shared.teacher_ids)

    (bucket_p, tail_p), (bucket_q, tail_q) = shared_and_rest(log_p, t_ids), shared_and_rest(log_q, s_ids)
    tail_p, tail_q = (tail.exp().sort(-1, descending=True)[0] for tail in (tail_p, tail_q))
    out["kl"], out["kl_tokens"] = float((bucket_p.exp() * (bucket_p - bucket_q)).sum()), len(rows)
    width = max(tail_p.shape[1], tail_q.shape[1])
    tail_p, tail_q = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (tail_p, tail_q))
    gaps = (tail_p - tail_q).abs()
    out["uld_full"] = float(gaps.sum())
    for k in TOPK:
        out[f"uld_k{k}"] = float(gaps[:, :k].sum())
        out[f"uld_bound_k{k}"] = float(tail_p[:, k:].sum() + tail_q[:, k:].sum())
    return out


def greedy_answers(model, tokenizer, prompts: list[list[int]], budget: int, stops: set[int], batch: int = 16):
    """Each prompt's greedy answer, cut after its first stop token, and whether it had one within `budget`."""
    from fsdp_kd.on_policy import cut_at_stop

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                 pad_token_id=pad)
        for row in out[:, width:].tolist():
            answer = cut_at_stop(row, stops)
            answers.append((answer, bool(answer) and answer[-1] in stops))
    return answers


def score(model_dir: str, teacher_dir: str, args) -> dict:
    """The scoring every row gets (see the module's docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from fsdp_kd.records import TokenSettings, record_to_sample

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    cross = CrossScoring.of(tokenizer, AutoTokenizer.from_pretrained(teacher_dir))
    figures_of = (token_kl_ce if cross is None else
                  lambda *a: cross_kl_ce(*a, cross=cross))  # (student, teacher, ids, positions, targets)
    stops = GenerationConfig.from_pretrained(model_dir).eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    settings = TokenSettings("question", "answer", None, True, False, False, 10**6, False)
    records = [json.loads(line) for line in open(args.test_data)][:args.eval]
    sums: dict[str, float] = {}
    prompts = []
    for i, record in enumerate(records):
        sample, _ = record_to_sample(record, settings, tokenizer, f"gsm8k/test.jsonl:{i + 1}")
        positions = [j for j, t in enumerate(sample.targets) if t >= 0]
        figures = figures_of(student, teacher, sample.input_ids, positions, [sample.targets[j] for j in positions])
        for key, value in {**figures, "tokens": len(positions)}.items():
            sums[key + "_ref"] = sums.get(key + "_ref", 0.0) + value
        prompts.append(sample.input_ids[:positions[0] + 1])  # the prompt: everything before the first answer token
    start = time.perf_counter()
    answers = greedy_answers(student, tokenizer, prompts, args.gen, stops)
    gen_wall = time.perf_counter() - start
    sums["kl_greedy"] = sums["kl_tokens_greedy"] = sums["tokens_greedy"] = 0.0
    for prompt, (answer, _) in zip(prompts, answers):
        if answer:
            ids = prompt + answer
            figures = figures_of(student, teacher, ids, list(range(len(prompt) - 1, len(ids) - 1)), answer)
            sums["kl_greedy"] += figures["kl"]
            sums["kl_tokens_greedy"] += figures["kl_tokens"]
            sums["tokens_greedy"] += len(answer)
    # CE is per answer token, every KL figure per token it was taken over (all of them, or the aligned ones)
    per_token = {key[:-4]: value / sums["tokens_ref" if key == "ce_ref" else "kl_tokens_ref"]
                 for key, value in sums.items() if key.endswith("_ref") and key not in ("tokens_ref", "kl_tokens_ref")}
    return {"ce_ref": per_token["ce"], "kl_ref": per_token["kl"],
            **{key: value for key, value in per_token.items() if key not in ("ce", "kl")},
            "kl_greedy": sums["kl_greedy"] / max(sums["kl_tokens_greedy"], 1),
            "stop_share": sum(stopped for _, stopped in answers) / len(answers),
            "greedy_tokens_mean": sums["tokens_greedy"] / len(answers), "greedy_wall_s": gen_wall,
            "eval_questions": len(records), "eval_tokens_ref": int(sums["tokens_ref"]),
            "kl_tokens_ref": int(sums["kl_tokens_ref"]), "cross_tokenizer": cross is not None,
            "example_answer": tokenizer.decode(answers[0][0])}


def student_of(args, teacher: str, kind: str) -> str:
    """`--student`, or the teacher's depth-pruned cut made once in OUT, with its vocabulary moved to the
    STUDENTS entry's tokenizer where it names one (also made once)."""
    if args.student:
        return args.student
    path = os.path.join(args.out, f"student_keep{args.keep}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        run(["-m", "fsdp_kd.prune", "--model", teacher, "--keep", str(args.keep), "--out", path],
            path + ".log")
    if STUDENTS[kind] is None:
        return path
    moved = f"{path}_{kind}"
    if not os.path.isfile(os.path.join(moved, "config.json")):
        run(["bench/transplant_vocab.py", "--model", path, "--tokenizer", realdata(STUDENTS[kind]), "--out", moved],
            moved + ".log")
    return moved


def budget_of(args) -> dict:
    return {"steps": args.steps, "seqs_per_step": args.seqs, "max_len": args.max_len, "learning_rate": args.lr,
            "eval_questions": args.eval, "gen_budget": args.gen, "kd_coef": args.kd_coef}


def table(out: str) -> str:
    """The markdown table of the JSONs in `out`: every recipe, its figures as ratios to SFT's where SFT has run,
    and the recipes not yet run."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        result = json.load(open(path))
        rows[result["tag"]] = result
    rows = dict(sorted(rows.items(), key=lambda item: (list(RECIPES).index(item[1]["recipe"]), item[0])))
    baselines = {RECIPES[r["recipe"]].student: r for r in rows.values()
                 if r["trains"] and not RECIPES[r["recipe"]].teacher}  # each student's SFT
    lines = ["| recipe | CE ref | CE / SFT | KL ref | KL / SFT | KL greedy | ends with stop | greedy tokens | "
             "train s | tok/s | goal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tag, r in rows.items():
        s, sft = r["scores"], baselines.get(RECIPES[r["recipe"]].student)
        ce_ratio = s["ce_ref"] / sft["scores"]["ce_ref"] if sft else None
        kl_ratio = s["kl_ref"] / sft["scores"]["kl_ref"] if sft else None
        goal = ("yes" if ce_ratio <= 1.05 and kl_ratio <= 0.8 else "no") if sft and r["trains"] and sft is not r \
            else ""
        train = r.get("train") or {}
        cells = [tag, f"{s['ce_ref']:.3f}", f"{ce_ratio:.3f}" if ce_ratio else "", f"{s['kl_ref']:.3f}",
                 f"{kl_ratio:.3f}" if kl_ratio else "", f"{s['kl_greedy']:.3f}", f"{s['stop_share']:.0%}",
                 f"{s['greedy_tokens_mean']:.0f}",
                 f"{train['train_wall_s']:.0f}" + (f" (+{train['cache_wall_s']:.0f} cache)" if "cache_wall_s" in train
                                                   else "") if train else "",
                 f"{train['tokens_per_s']:.0f}" if train else "", goal]
        lines.append("| " + " | ".join(cells) + " |")
    gaps = ["", "Top-k cache on real text: KL(teacher ‖ student) on the teacher's top-k + rest buckets against the full "
            "KL (its share of the full KL lost), and the teacher's mean mass past rank k, on the reference answers:", "",
            "| student | full KL | " + " | ".join(f"bucket KL k={k}" for k in TOPK) + " | "
            + " | ".join(f"teacher tail k={k}" for k in TOPK) + " |", "|---" * (2 + 2 * len(TOPK)) + "|"]
    for tag, r in rows.items():
        s = r["scores"]
        if f"kl_buckets_k{TOPK[0]}" in s and tag != "teacher":
            gaps.append(f"| {tag} | {s['kl_ref']:.3f} | " + " | ".join(
                f"{s[f'kl_buckets_k{k}']:.3f} (-{1 - s[f'kl_buckets_k{k}'] / s['kl_ref']:.0%})" for k in TOPK)
                + " | " + " | ".join(f"{s[f'teacher_tail_k{k}']:.3f}" for k in TOPK) + " |")
    lines += gaps if len(gaps) > 5 else []
    uld = ["", "Across tokenizers (the `xtok_` rows: KL ref and KL greedy are over the one-to-one aligned answer "
           "tokens, on the shared tokens + one rest bucket a side): ULD's value at the full sort and its top-k "
           "shortfall (ULD_full − ULD_k) against the bound the two tails' mass past rank k gives, per aligned token:",
           "", "| student | aligned share | ULD full | " + " | ".join(f"shortfall k={k} (bound)" for k in TOPK) + " |",
           "|---" * (3 + len(TOPK)) + "|"]
    for tag, r in rows.items():
        s = r["scores"]
        if "uld_full" in s:
            uld.append(f"| {tag} | {s['kl_tokens_ref'] / s['eval_tokens_ref']:.1%} | {s['uld_full']:.4f} | "
                       + " | ".join(f"{s['uld_full'] - s[f'uld_k{k}']:.4f} ({s[f'uld_bound_k{k}']:.4f})" for k in TOPK)
                       + " |")
    lines += uld if len(uld) > 5 else []
    missing = [name for name in RECIPES if name not in {r["recipe"] for r in rows.values()}]
    budgets = {json.dumps(r["budget"], sort_keys=True) for r in rows.values() if r["trains"]}
    notes = [f"Budget: {b}" for b in sorted(budgets)]
    if missing:
        notes.append(f"Not yet run: {', '.join(missing)}.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="train and score this recipe")
    parser.add_argument("--table", action="store_true", help="print and write OUT/table.md from OUT's JSONs")
    parser.add_argument("--out", default=os.path.join(REPO, "bench_out", "real_teacher"))
    parser.add_argument("--teacher", help="a local HF teacher directory; default: the real teacher's cache")
    parser.add_argument("--teacher_cache_dir", default=DEFAULT_CACHE, help="where bench/real_teacher_model.py keeps it")
    parser.add_argument("--student", help="an HF student directory with the teacher's tokenizer; default: the cut")
    parser.add_argument("--keep", type=int, default=6, help="the cut's layers (python -m fsdp_kd.prune --keep)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seqs", type=int, default=4, help="sequences per optimizer step")
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--kd_coef", type=float, help="the KD recipes' kd_coef; default: train.py's")
    parser.add_argument("--eval", type=int, default=8, help="held-out GSM8K test questions scored")
    parser.add_argument("--gen", type=int, default=96, help="the greedy answers' (and on-policy's) token budget")
    parser.add_argument("--rescore", action="store_true",
                        help="score the recipe's trained student again (after a change to the scoring), keeping its "
                             "training figures; the budget flags must be the ones it trained with")
    args = parser.parse_args()
    if args.table == bool(args.recipe):
        sys.exit("error: give --recipe NAME or --table")
    os.makedirs(args.out, exist_ok=True)
    if args.table:
        text = table(args.out)
        open(os.path.join(args.out, "table.md"), "w").write(text)
        print(text)
        return
    args.tag = args.recipe + (f"@kd{args.kd_coef:g}" if args.kd_coef is not None and RECIPES[args.recipe].teacher
                              and RECIPES[args.recipe].trains else "")
    args.train_data, args.test_data = realdata("gsm8k/train.jsonl"), realdata("gsm8k/test.jsonl")
    try:
        teacher = args.teacher or real_teacher(args.teacher_cache_dir)
    except TeacherUnavailable as e:
        sys.exit(f"error: {e}")
    recipe = RECIPES[args.recipe]
    student = student_of(args, teacher, recipe.student)
    if args.rescore and recipe.trains:
        previous = os.path.join(args.out, f"{args.tag}.json")
        if not os.path.isfile(previous):
            sys.exit(f"error: --rescore: {previous} does not exist; run the recipe without --rescore first")
        figures = json.load(open(previous))["train"]
        trained = figures["train_keys"]["save_path"]
    else:
        trained, figures = (train(recipe, args, teacher, student) if recipe.trains
                            else ({"student": student, "teacher": teacher}[recipe.model], None))
    result = {"tag": args.tag, "recipe": args.recipe, "trains": recipe.trains, "budget": budget_of(args),
              "teacher": teacher, "student_init": student, "train": figures,
              "scores": score(trained, teacher, args)}
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k in ("tag", "train", "scores")}, indent=1))


if __name__ == "__main__":
    main()
