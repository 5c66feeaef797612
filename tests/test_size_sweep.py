"""The size sweep (issue 20): the sizes users run, not the even ones the other multi-rank tests pick.

World sizes 1, 2 and 3 (gloo runs 3 ranks on 2 cores), micro-batch 1 (the default) and an odd one, 41 training and 5
eval records (neither a multiple of any world × micro-batch), teacher-cache chunks whose last one holds fewer samples
than the ranks, packing on and off, over the live teacher, both cache modes and on-policy. Each case must run with a
finite loss, count every trained token exactly once, and evaluate as every other world size does.

One torchrun per world size runs all of that world's cases in one process group (tests/sweep_worker.py); the tests
below compare the three launches' results.
"""

import json
import math

import pytest

from conftest import REPO, torchrun

TRAIN_RECORDS, EVAL_RECORDS = 41, 5  # 41 is prime: no world × micro-batch divides it; 5 leaves ranks 2 and 3 short
CACHE_SAMPLES = TRAIN_RECORDS + EVAL_RECORDS  # a cache holds every training and eval sample: 46
SHORT_BY_ONE, SHORT_BY_TWO = 9, 4  # cache_chunk_samples: 46 = 5 × 9 + 1 = 11 × 4 + 2, a last chunk of 1 or 2 samples

# (world size, micro_train_batch_size, teacher, packing_samples, cache_chunk_samples): a pairwise covering design.
# Worlds 1 and 2 each run every teacher once, and between them every (teacher, micro-batch), (teacher, packing) and
# (micro-batch, packing) pair; world 3 runs every teacher again with both micro-batches and both packings. The six
# cache cases cover every (chunk, world), (chunk, mode), (chunk, micro-batch) and (chunk, packing) pair. The two
# crashes issue 20 found are in it: a last chunk shorter than the world (2:topk, 3:topk, 3:sampled) and evaluation
# from a cache at micro-batch 1 where a rank's last eval micro-batch holds only a masked copy (2:topk, 3:topk,
# 3:sampled: 5 records on 2 or 3 ranks).
CASES = [
    (1, 1, "live", False, None),
    (1, 3, "topk", True, SHORT_BY_ONE),
    (1, 1, "sampled", True, SHORT_BY_TWO),
    (1, 3, "on_policy", False, None),
    (2, 3, "live", True, None),
    (2, 1, "topk", False, SHORT_BY_ONE),
    (2, 3, "sampled", False, SHORT_BY_TWO),
    (2, 1, "on_policy", True, None),
    (3, 3, "live", False, None),
    (3, 1, "topk", False, SHORT_BY_TWO),
    (3, 1, "sampled", True, SHORT_BY_ONE),
    (3, 3, "on_policy", True, None),
]
WORLDS = sorted({case[0] for case in CASES})
RTOL = 1e-5  # fp32: the same sums, split over other ranks and micro-batches, round differently


def case_name(world, micro, teacher, packing, chunk) -> str:
    return f"{world}:{teacher}:micro{micro}:{'packed' if packing else 'padded'}" + (f":chunk{chunk}" if chunk else "")


def plan_case(world, micro, teacher, packing, chunk) -> dict:
    flags = {"micro_train_batch_size": micro, "packing_samples": packing,
             "on_policy_ratio": 0.5 if teacher == "on_policy" else 0.0}
    cache = {"cache_mode": teacher, "cache_chunk_samples": chunk} if chunk else None
    return {"name": case_name(world, micro, teacher, packing, chunk), "flags": flags, "cache": cache}


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory):
    """{world size: (its launch's CompletedProcess, {case name: result})}."""
    assert (CACHE_SAMPLES % SHORT_BY_ONE, CACHE_SAMPLES % SHORT_BY_TWO) == (1, 2)  # the short last chunks
    root = tmp_path_factory.mktemp("sweep")
    for name, records in (("train", TRAIN_RECORDS), ("eval", EVAL_RECORDS)):
        with open(tiny[name]) as f:
            (root / f"{name}.jsonl").write_text("".join(f.readlines()[:records]))
    # train_batch_size 18 is the least multiple of every world × micro-batch here, so every case trains the same
    # global batches: 2 steps, 36 of the 41 records in the epoch's order
    flags = {"pretrain": tiny["student"], "teacher_model": tiny["teacher"], "dataset": str(root / "train.jsonl"),
             "eval_dataset": str(root / "eval.jsonl"), "train_batch_size": 18, "max_steps": 2, "max_len": 32,
             "learning_rate": 3e-3, "lr_warmup_ratio": 0.0, "kd_coef": 0.5, "param_dtype": "fp32",
             "logging_steps": 1, "eval_steps": 2, "generate_max_new_tokens": 8, "cache_k": 8, "cache_n": 8}
    launches = {}
    for world in WORLDS:
        plan, out = root / f"plan{world}.json", root / f"results{world}.json"
        plan.write_text(json.dumps({"root": str(root), "flags": flags,
                                    "cases": [plan_case(*case) for case in CASES if case[0] == world]}))
        proc = torchrun([str(REPO / "tests" / "sweep_worker.py"), str(plan), str(out)], nproc=world, timeout=300,
                        check=False)
        launches[world] = (proc, json.loads(out.read_text()) if out.exists() else {})
    return launches


def results(sweep) -> dict:
    """{case: result} over every world size; fails where a case did not finish, naming it for every world size, with
    the error lines of its launch (a case that fails ends its launch: the cases after it do not run)."""
    out, failures, first_output = {}, [], ""
    for world, (proc, done) in sweep.items():
        missing = [case_name(*c) for c in CASES if c[0] == world and case_name(*c) not in done]
        if proc.returncode == 0 and not missing:
            out.update({tuple(c): done[case_name(*c)] for c in CASES if c[0] == world})
            continue
        errors = [line for line in proc.stderr.splitlines() if ("Error" in line or "error:" in line)
                  and "pair.cc" not in line and "ChildFailedError" not in line]  # not the peers' lost connections
        failed = (f"case {missing[0]} failed, so {missing[1:]} did not run" if missing
                  else "every case finished, then the launch failed")
        failures.append(f"world size {world}: {failed} (exit {proc.returncode}); its errors:\n  "
                        + "\n  ".join(errors[-6:]))
        first_output = first_output or f"world size {world}'s output:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert not failures, "\n".join(failures) + "\n" + first_output
    return out


def agree(cases: dict, keys=None) -> None:
    """Every case's `keys` (all of the first case's where None) equal the first case's to RTOL."""
    (first, reference), *others = cases.items()
    for case, values in others:
        for key in keys or reference:
            assert values[key] == pytest.approx(reference[key], rel=RTOL, abs=1e-7), (
                f"{key}: {case_name(*case)} has {values[key]}, {case_name(*first)} {reference[key]}")


def test_every_case_runs_with_a_finite_loss(sweep):
    for case, result in results(sweep).items():
        assert len(result["steps"]) == 2, case_name(*case)
        for values in (*result["steps"], result["eval_before"], result["eval_after"]):
            bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
            assert not bad, f"{case_name(*case)}: {bad}"
        if case[2] == "on_policy":  # the student wrote some of the responses it trained on
            assert sum(step["on_policy_share"] for step in result["steps"]) > 0, case_name(*case)


def test_a_cache_is_complete_on_every_rank_when_its_build_returns(sweep):
    """A run that builds its cache in-process and then trains from it (the demo does) reads cache.json at once:
    every rank must find the cache complete when `CacheBuilder.run` returns, not only the rank that completes it."""
    found = {case_name(*case): r["cache_complete_on_ranks"] for case, r in results(sweep).items() if case[4]}
    incomplete = {name: ranks for name, ranks in found.items() if not all(ranks)}
    assert not incomplete, f"complete, per rank, when CacheBuilder.run returned: {incomplete}"


def test_every_trained_token_is_counted_once(sweep):
    """The `tokens` metric over the two steps is the trainable tokens of the 36 samples the epoch order draws, at
    every world size and micro-batch (on-policy: of those samples with the student's responses), and evaluation
    counts each eval token once, masked copies none."""
    done = results(sweep)
    for case, result in done.items():
        trained = sum(step["tokens"] for step in result["steps"])
        if case[2] == "on_policy":
            assert result["train_samples_rewritten"] == result["train_samples_expected"], case_name(*case)
            assert trained == result["train_tokens_rewritten"], case_name(*case)
        else:
            assert trained == result["train_tokens_expected"], case_name(*case)
        for when in ("eval_before", "eval_after"):
            assert result[when]["eval_tokens"] == result["eval_tokens_expected"], (case_name(*case), when)
    off_policy = {case: r for case, r in done.items() if case[2] != "on_policy"}
    assert len({r["train_tokens_expected"] for r in off_policy.values()}) == 1
    assert len({r["eval_tokens_expected"] for r in done.values()}) == 1


def test_the_untrained_student_evaluates_alike_at_every_size(sweep):
    """Before any step every case holds the same weights, so evaluation must agree across world sizes, micro-batches
    and packing: the CE everywhere; every metric against the live teacher (on-policy evaluates off-policy), and
    against the top-k caches, which hold the same k tokens however the build was split. A sampled cache's draws are
    seeded per chunk and rank, so only its CE compares."""
    done = {case: r["eval_before"] for case, r in results(sweep).items()}
    agree(done, ["eval_ce_loss", "eval_tokens"])
    agree({case: r for case, r in done.items() if case[2] in ("live", "on_policy")})
    agree({case: r for case, r in done.items() if case[2] == "topk"})


def test_the_same_global_batches_train_the_same_student_at_every_size(sweep):
    """Off-policy, each step's gradient is the mean over the same 18 samples at every world size and micro-batch,
    so the trained students evaluate alike (live teacher; top-k caches)."""
    done = {case: r["eval_after"] for case, r in results(sweep).items()}
    for teacher in ("live", "topk"):
        agree({case: r for case, r in done.items() if case[2] == teacher})
