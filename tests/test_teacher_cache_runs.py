"""`cache_teacher` and `train.py --teacher_cache` end to end under torchrun on 2 ranks (a build also on 3): a cache of
every token trains exactly like the live teacher, at any world and chunk size and at micro-batch 1 with uneven eval
data, a killed build resumes, and a cache for other data or another τ is refused."""

import json
import os
import shutil

import pytest

from conftest import REPO, python_run, read_metrics, start_torchrun, torchrun, train_args, wait_for
from test_checkpoint import kill_everything

TRAIN = str(REPO / "train.py")
VOCAB = 77  # the tiny models' character tokenizer


def cache_args(tiny, cache, **overrides):
    flags = {"eval_dataset": tiny["eval"], "teacher_cache": str(cache), "cache_chunk_samples": 64, **overrides}
    return ["-m", "fsdp_kd.cache_teacher", *train_args(tiny, cache / "unused", **flags)]


LIKE_LIVE = {"loss": "loss", "ce": "ce", "kd": "kd", "kl": "kl_buckets", "eval_loss": "eval_loss",
             "eval_kl": "eval_kl_buckets", "grad_norm": "grad_norm"}


def assert_like_live(live: list[dict], cached: list[dict]) -> None:
    """Every logged figure of a run from a k = V float32 cache equals the live teacher's run's to 1e-5."""
    assert len(live) == len(cached)
    for a, b in zip(live, cached):
        for name, cached_name in LIKE_LIVE.items():
            if name in a:
                assert b[cached_name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (name, a, b)


def test_a_cache_of_every_token_trains_exactly_like_the_live_teacher(tiny, tmp_path):
    """k = V in float32, τ = 2: every step's loss, CE, KD and KL, and the evaluation, equal the live run's."""
    cache = tmp_path / "cache"
    common = dict(eval_dataset=tiny["eval"], eval_steps=2, kd_temperature=2.0, kd_loss="jsd", logging_steps=1)
    torchrun(cache_args(tiny, cache, cache_k=VOCAB, cache_log_p_dtype="float32", kd_temperature=2.0))
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["complete"] and meta["slots"] == VOCAB and len(meta["sources"]) == 2
    torchrun([TRAIN, *train_args(tiny, tmp_path / "live", **common)])
    torchrun([TRAIN, *train_args(tiny, tmp_path / "cached", teacher_model=None, teacher_cache=str(cache), **common)])
    live, cached = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    assert len(live) == 6
    assert_like_live(live, cached)
    # a divergence over the student's own top tokens needs the teacher there, which a top-k cache does not hold
    proc = _train_once(tiny, tmp_path / "refused", cache, kd_temperature=2.0, kd_loss="reverse_kl_student_topk")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "key kd_loss: reverse_kl_student_topk needs the teacher's probability at the student's" in lines[0]
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def uneven(tiny, tmp_path_factory):
    """The sizes users run and the tests above avoid: micro_train_batch_size 1 (the default) and three eval records,
    so on 2 ranks one rank's last eval micro-batch holds only a masked copy. Returns the training flags and the live
    teacher's run, which every cache below must reproduce."""
    root = tmp_path_factory.mktemp("uneven")
    eval3 = root / "eval3.jsonl"
    with open(tiny["eval"]) as f:
        eval3.write_text("".join(f.readlines()[:3]))
    common = dict(eval_dataset=str(eval3), micro_train_batch_size=1, max_steps=2, eval_steps=1, kd_temperature=2.0,
                  kd_loss="jsd", logging_steps=1)
    torchrun([TRAIN, *train_args(tiny, root / "live", **common)])
    live = read_metrics(root / "live")
    assert sum("eval_loss" in m for m in live) == 2
    return common, live


# test_size_sweep runs caches with a short last chunk at worlds 1-3 for crashes and token counts; this exact check
# against the live teacher keeps an ordinary build on 2 ranks and the hardest case, 3 ranks with a short last chunk
@pytest.mark.parametrize("nproc,short_last_chunk", [(2, False), (3, True)])
def test_a_cache_built_at_any_world_and_chunk_size_trains_like_the_live_teacher(tiny, tmp_path, uneven, nproc,
                                                                                short_last_chunk):
    """Built on 2 or 3 ranks, with a last chunk of fewer samples than ranks (the ranks without a sample write a part
    of none) or not, a k = V cache trains at micro-batch 1 and evaluates three records on 2 ranks (a rank's micro-batch
    of only a masked copy reads no rows) exactly like the live teacher."""
    common, live = uneven
    samples = sum(1 for path in (tiny["train"], common["eval_dataset"]) for _ in open(path))
    chunk = samples - 1 if short_last_chunk else 64
    cache = tmp_path / "cache"
    torchrun(cache_args(tiny, cache, cache_k=VOCAB, cache_log_p_dtype="float32", cache_chunk_samples=chunk,
                        eval_dataset=common["eval_dataset"], kd_temperature=common["kd_temperature"]), nproc=nproc)
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["complete"] and sum(s["samples"] for s in meta["sources"]) == samples
    assert 0 < samples % chunk < nproc if short_last_chunk else samples % chunk >= nproc
    torchrun([TRAIN, *train_args(tiny, tmp_path / "cached", teacher_model=None, teacher_cache=str(cache), **common)])
    assert_like_live(live, read_metrics(tmp_path / "cached"))


def _parts(cache):
    return {name: (cache / name).stat().st_mtime_ns for name in os.listdir(cache) if name.endswith(".safetensors")}


def test_a_killed_build_keeps_its_finished_parts_and_resumes(tiny, tmp_path):
    cache, reference = tmp_path / "cache", tmp_path / "reference"
    torchrun(cache_args(tiny, reference, cache_chunk_samples=16))
    proc = start_torchrun(cache_args(tiny, cache, cache_chunk_samples=16))
    wait_for(cache, proc, timeout=180, ready=lambda c: os.path.isdir(c) and len(_parts(c)) >= 4)
    kill_everything(proc)
    kept = _parts(cache)
    assert not json.loads((cache / "cache.json").read_text())["complete"]
    out = torchrun(cache_args(tiny, cache, cache_chunk_samples=16))
    assert "already done" in out.stdout
    after = _parts(cache)
    assert all(after[name] == mtime for name, mtime in kept.items())  # finished parts were not redone
    assert sorted(after) == sorted(_parts(reference))
    from safetensors.torch import load_file

    for name in after:  # top-k is deterministic: the resumed cache equals an uninterrupted one
        a, b = load_file(str(cache / name)), load_file(str(reference / name))
        assert all(a[k].equal(b[k]) for k in a), name


def _train_once(tiny, out, cache, **flags):
    args = train_args(tiny, out, **{"teacher_model": None, "teacher_cache": str(cache), "max_steps": 1, **flags})
    return python_run([TRAIN, *args])


def test_a_sampled_cache_trains_forward_kl_and_one_for_other_tokens_temperature_or_teacher_is_refused(tiny,
                                                                                                     tmp_path):
    """One sampled build serves both checks: the matching run, whose config still names the teacher the cache was
    built with (the same run.yaml as the build), trains and logs its KL as an estimate; each mismatch, another
    teacher_model included, is one line naming what differs, before any output exists."""
    cache = tmp_path / "cache"
    torchrun(cache_args(tiny, cache, cache_mode="sampled", cache_n=8))
    proc = _train_once(tiny, tmp_path / "out", cache, logging_steps=1, teacher_model=tiny["teacher"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = read_metrics(tmp_path / "out")[0]
    assert "kl_estimate" in first and "kl" not in first and "teacher_ce" not in first
    cases = [({"max_len": 8}, r"does not hold this run's data: .*train\.jsonl .*max_len 2048 then, 8 now"),
             ({"kd_temperature": 2.0}, r"kd_temperature 1, this run has 2"),
             ({"kd_loss": "reverse_kl"}, r"key kd_loss: reverse_kl needs .* a sampled cache"),
             ({"kd_loss": "reverse_kl_student_topk"}, r"key kd_loss: reverse_kl_student_topk needs .* or a hidden cache"),
             ({"pretrain": tiny["qwen_student"]}, r"another tokenizer|does not hold this run's data"),
             ({"teacher_model": tiny["qwen_teacher"]}, r"key teacher_model: .*qwen_teacher is not the teacher .* "
                                                       r"built with \(.*/teacher\); drop teacher_model")]
    for flags, message in cases:
        proc = _train_once(tiny, tmp_path / "refused", cache, **flags)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert __import__("re").search(message, lines[0]), lines[0]
        assert not (tmp_path / "refused").exists()


def test_a_hub_teacher_is_recorded_by_its_id_so_a_build_resumes_from_another_directory(tiny, tmp_path, monkeypatch):
    """A teacher given as a hub id (here served offline from a local HF cache) is recorded as that id, not as a path
    under the directory the build was started in: the same command from another directory takes the cache as its
    own."""
    hub, revision = tmp_path / "hub", "0" * 40
    repo = hub / "models--fsdp-kd-tests--tiny-teacher"
    shutil.copytree(tiny["teacher"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    args = cache_args(tiny, cache, teacher_model="fsdp-kd-tests/tiny-teacher")
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
    torchrun(args, cwd=tmp_path / "a")
    assert "already complete" in torchrun(args, cwd=tmp_path / "b").stdout
    assert json.loads((cache / "cache.json").read_text())["teacher"] == "fsdp-kd-tests/tiny-teacher"


def test_a_hidden_state_cache_trains_like_the_live_teacher(tiny, tmp_path, uneven):
    """`cache_mode hidden`: the teacher's final hidden states and its head. In float32 every logged figure equals
    the live teacher's run (micro-batch 1, uneven eval, JSD at τ = 2) under the live names (the logits are the
    teacher's own); in bfloat16, the default, to bf16 tolerance, at 2·H bytes per token. Training loads no teacher
    model, and every divergence is allowed (the student's top-k one included, which no other cache takes)."""
    common, live = uneven
    exact, rounded = tmp_path / "exact", tmp_path / "bf16"
    for cache, dtype in ((exact, "float32"), (rounded, "bfloat16")):
        torchrun(cache_args(tiny, cache, cache_mode="hidden", cache_hidden_dtype=dtype,
                            eval_dataset=common["eval_dataset"], kd_temperature=common["kd_temperature"]))
    meta = json.loads((rounded / "cache.json").read_text())
    hidden = 64  # the tiny teacher's
    assert meta["slots"] == hidden and meta["head"] == {"scale": 1.0, "softcap": None}
    assert 2 * hidden < meta["bytes"] / meta["tokens"] < 2 * hidden + 16  # the rows, and their share of the offsets
    proc = torchrun([TRAIN, *train_args(tiny, tmp_path / "from_exact", teacher_model=None, teacher_cache=str(exact),
                                        **common)])
    assert "loading the teacher" not in proc.stdout and "its hidden rows (hidden size = 64)" in proc.stdout
    from_exact = read_metrics(tmp_path / "from_exact")
    assert len(from_exact) == len(live)
    for a, b in zip(live, from_exact):
        assert a.keys() - {"tokens_per_sec", "peak_mem_gb"} == b.keys() - {"tokens_per_sec", "peak_mem_gb"}
        for name in ("loss", "ce", "kd", "kl", "teacher_entropy", "teacher_ce", "eval_loss", "eval_kl"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (name, a, b)
    torchrun([TRAIN, *train_args(tiny, tmp_path / "from_bf16", teacher_model=None, teacher_cache=str(rounded),
                                 **common)])
    for a, b in zip(live, read_metrics(tmp_path / "from_bf16")):
        for name in ("loss", "kd", "kl", "eval_loss"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=2e-2, abs=2e-3), (name, a, b)
    torchrun([TRAIN, *train_args(tiny, tmp_path / "student_topk", teacher_model=None, teacher_cache=str(rounded),
                                 **{**common, "kd_loss": "reverse_kl_student_topk", "student_topk": 4})])
