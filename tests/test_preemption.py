"""Preemption: a stop signal on one rank stops every rank after the step in progress, with a complete checkpoint of it
and exit code 75, and the run resumed from there ends bitwise equal to one never stopped; also with async saves, with
SIGUSR1 as preempt_signal, with the signal during a save, with a step too long for the grace period, in a cache build,
and (the one real torchrun here) with SIGTERM sent to torchrun itself.

The signal is raised inside a rank's own process at a chosen point (tests/dist_worker.py's preempt mode), so these
runs share the case host like any other; its handlers are installed and removed per run."""

import json
import os
import signal
import time

import pytest
import torch

from conftest import REPO, read_metrics, start_torchrun, torchrun, train_args, wait_for
from test_checkpoint import comparable
from test_teacher_cache_runs import _parts, cache_args

TRAIN = str(REPO / "train.py")
WORKER = str(REPO / "tests" / "dist_worker.py")
PREEMPTED = 75  # preemption.PREEMPTED_EXIT_CODE, as docs/training.md gives it


def resume_args(tiny, save_path, **overrides):
    """A run of 10 steps that saves every 4 and resumes with the same command."""
    flags = dict(max_steps=10, save_steps=4, logging_steps=1, load_checkpoint="true", max_ckpt_num=10)
    return train_args(tiny, save_path, **{**flags, **overrides})


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    save = tmp_path_factory.mktemp("preempt_ref") / "run"
    torchrun([TRAIN, *resume_args(tiny, save)])
    return save


def preempted_run(tmp_path, when: str, name: str, rank: int, flags: list[str]):
    return torchrun([WORKER, "preempt", str(tmp_path / "unused"), when, name, str(rank), *flags], check=False)


def assert_resumes_like(save, reference, args, step):
    """The same command resumes at `step` and ends with the reference's metrics and weights, bitwise."""
    resumed = torchrun([TRAIN, *args])
    assert f"resumed from {save / 'checkpoints' / f'step_{step}'} at step {step}" in resumed.stdout
    assert comparable(read_metrics(save)) == comparable(read_metrics(reference))
    from safetensors.torch import load_file

    final = load_file(save / "model-00001-of-00001.safetensors")
    expected = load_file(reference / "model-00001-of-00001.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def complete(save) -> list[str]:
    """The checkpoint directories, each checked to be complete (a train state) or not named as one."""
    names = sorted(os.listdir(save / "checkpoints"))
    for name in names:
        assert not name.endswith((".partial", ".deleting")), names
        assert (save / "checkpoints" / name / "train_state.json").is_file(), name
    return names


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_sigterm_on_one_rank_saves_the_step_in_progress_and_resumes_exactly(tiny, tmp_path, reference, async_save):
    """The signal comes after step 5, so step 6 is the step in progress; it is no save_steps step (4): its checkpoint
    is the preemption's own, written synchronously even with async_save. Rank 1 alone got the signal, and rank 0
    stopped with it."""
    save = tmp_path / "run"
    args = resume_args(tiny, save, async_save=async_save)
    proc = preempted_run(tmp_path, "step:5", "SIGTERM", 1, args)
    assert proc.codes == [PREEMPTED, PREEMPTED], proc.stderr[-3000:]
    assert (f"preempted at step 6/10 (a stop signal on another rank): checkpoint {save / 'checkpoints' / 'step_6'} "
            "is complete") in proc.stdout
    assert "--load_checkpoint true" in proc.stdout
    assert complete(save) == ["step_4", "step_6"]
    assert not (save / "config.json").exists()  # stopped, not exported
    assert [m["step"] for m in read_metrics(save)] == list(range(1, 7))
    assert_resumes_like(save, reference, args, 6)


def test_sigusr1_as_preempt_signal_stops_the_run_as_sigterm_does(tiny, tmp_path):
    save = tmp_path / "run"
    args = resume_args(tiny, save, preempt_signal="SIGUSR1")
    proc = preempted_run(tmp_path, "step:4", "SIGUSR1", 0, args)
    assert proc.codes == [PREEMPTED, PREEMPTED], proc.stderr[-3000:]
    assert "preempted at step 5/10 (SIGUSR1 here)" in proc.stdout
    assert complete(save) == ["step_4", "step_5"]  # resuming from it: as from the SIGTERM's, above


def test_a_signal_on_the_last_step_finishes_the_run_and_exports(tiny, tmp_path, reference):
    """Step 10 of 10 is the step in progress: nothing is left to resume, so the run ends as usual (its last
    evaluation, the export, exit 0) and equals the reference."""
    save = tmp_path / "run"
    proc = preempted_run(tmp_path, "step:9", "SIGTERM", 1, resume_args(tiny, save))
    assert proc.codes == [0, 0], proc.stderr[-3000:]
    assert "preempted" not in proc.stdout
    assert comparable(read_metrics(save)) == comparable(read_metrics(reference))
    assert (save / "config.json").exists()


def test_a_signal_during_a_save_finishes_it_then_stops_after_the_next_step(tiny, tmp_path, reference):
    """The signal comes as step 8's save begins: that save completes (the handler only notes the signal), and the
    ranks agree on it with step 9's counts. (With async_save, the save in flight is finished before the preemption's:
    the test above, whose step 4 save is still pending when step 6 stops.)"""
    save = tmp_path / "run"
    args = resume_args(tiny, save)
    proc = preempted_run(tmp_path, "save:8", "SIGTERM", 0, args)
    assert proc.codes == [PREEMPTED, PREEMPTED], proc.stderr[-3000:]
    assert "preempted at step 9/10 (SIGTERM here)" in proc.stdout
    assert complete(save) == ["step_4", "step_8", "step_9"]
    assert_resumes_like(save, reference, args, 9)


def test_a_step_longer_than_the_grace_period_stops_at_a_micro_batch_unsaved(tiny, tmp_path, reference):
    """With a grace period shorter than any step, the ranks check between micro-batches once a step is measured;
    the signal after step 6 stops step 7 before its first micro-batch, nothing of it saved, and the run resumes from
    step_4, the last complete checkpoint."""
    save = tmp_path / "run"
    args = resume_args(tiny, save, preempt_grace_s=0.001)
    proc = preempted_run(tmp_path, "step:6", "SIGTERM", 1, args)
    assert proc.codes == [PREEMPTED, PREEMPTED], proc.stderr[-3000:]
    assert ("preempted during step 7/10 (a stop signal on another rank): the rest of it and a save would take longer "
            "than what is left of preempt_grace_s 0.001s, so it stopped before micro-batch 1 of 2 and did not save "
            f"it; the last complete checkpoint is {save / 'checkpoints' / 'step_4'}") in proc.stdout
    assert complete(save) == ["step_4"]
    assert_resumes_like(save, reference, args, 4)


def test_with_teacher_ranks_a_step_dropped_midway_stops_every_rank(tiny, tmp_path):
    """The signal on both student ranks, with a grace period shorter than a step: the step in progress is dropped
    midway, the hidden states the teacher rank computed for the rest of it are received, and the teacher rank, told
    by the student ranks' last message, stops with their exit code."""
    save = tmp_path / "run"
    args = resume_args(tiny, save, teacher_ranks=1, preempt_grace_s=0.001, save_steps=-1)
    proc = torchrun([WORKER, "preempt", str(tmp_path / "unused"), "step:3", "SIGTERM", "-1", *args], nproc=3,
                    check=False)
    assert proc.codes == [PREEMPTED] * 3, proc.stderr[-3000:]
    assert "preempted during step 4/10 (SIGTERM here)" in proc.stdout and "did not save it" in proc.stdout
    assert not (save / "checkpoints").exists()


def test_a_signal_on_the_teacher_rank_alone_stops_the_student_ranks_with_a_checkpoint(tiny, tmp_path):
    """The teacher rank (global rank 2) gets the signal as step 2's micro-batches reach it (its 5th receive: two
    student ranks, two micro-batches a step); its flag rides back with their hidden states, so the student ranks stop
    after step 2 and save it, and the teacher rank stops when they say stop."""
    save = tmp_path / "run"
    args = resume_args(tiny, save, teacher_ranks=1)
    proc = torchrun([WORKER, "preempt", str(tmp_path / "unused"), "serve:5", "SIGTERM", "2", *args], nproc=3,
                    check=False)
    assert proc.codes == [PREEMPTED] * 3, proc.stderr[-3000:]
    assert "preempted at step 2/10 (a stop signal on another rank)" in proc.stdout
    assert complete(save) == ["step_2"]


def test_a_cache_build_stops_at_a_chunk_boundary_and_resumes(tiny, tmp_path):
    cache, uninterrupted = tmp_path / "cache", tmp_path / "reference"
    torchrun(cache_args(tiny, uninterrupted, cache_chunk_samples=64))
    flags = cache_args(tiny, cache, cache_chunk_samples=64)[2:]
    proc = preempted_run(tmp_path, "chunk:1", "SIGTERM", 1, flags)
    assert proc.codes == [PREEMPTED, PREEMPTED], proc.stderr[-3000:]
    assert "cache build stopped on a stop signal (on another rank) before chunk 3 of" in proc.stdout
    kept = _parts(cache)
    assert sorted(kept) == sorted(n for n in _parts(uninterrupted) if n.split("-")[1] in ("000000", "000001"))
    assert not json.loads((cache / "cache.json").read_text())["complete"]
    out = torchrun(cache_args(tiny, cache, cache_chunk_samples=64))
    assert "2 chunks already done" in out.stdout
    assert sorted(_parts(cache)) == sorted(_parts(uninterrupted))
    from safetensors.torch import load_file

    for name in _parts(cache):
        a, b = load_file(str(cache / name)), load_file(str(uninterrupted / name))
        assert all(a[k].equal(b[k]) for k in a), name


def test_sigterm_to_torchrun_saves_and_the_run_resumes_exactly(tiny, tmp_path, reference):
    """The scheduler's way: SIGTERM to torchrun itself after the third logged step, which forwards it to the ranks.
    A real torchrun, the one this file starts: what is tested is torchrun's forwarding and the processes' exit."""
    save = tmp_path / "run"
    args = resume_args(tiny, save, save_steps=-1)
    proc = start_torchrun([TRAIN, *args])
    wait_for(save / "metrics.jsonl", proc, ready=lambda p: os.path.exists(p) and len(open(p).readlines()) >= 3)
    signalled = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert time.time() - signalled < 60, output[-3000:]
    assert "preempted at step" in output, output[-3000:]
    (name,) = complete(save)
    step = int(name.split("_")[1])
    assert step >= 3 and not (save / "config.json").exists()
    assert_resumes_like(save, reference, resume_args(tiny, save), step)
