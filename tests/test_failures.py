"""Failures mid-run, with real faults: one rank's error ends the job fast, non-finite steps never reach the weights,
a full disk during a save is reported and loses nothing."""

import glob
import os
import subprocess

import pytest
import torch

from conftest import REPO, end_after, has_lines, read_metrics, start_torchrun, torchrun, train_args, wait_for

TRAIN = str(REPO / "train.py")


def long_run(tiny, save_path, **overrides):
    flags = dict(max_steps=100000, max_epochs=10000, logging_steps=1)
    flags.update(overrides)
    return train_args(tiny, save_path, **flags)


def test_one_rank_failing_ends_the_whole_job_within_a_minute(tiny, tmp_path):
    """Rank 0 alone writes metrics.jsonl; turning it into a directory mid-run makes rank 0 alone raise. Rank 1 is
    then blocked in a collective that rank 0 will never join."""
    save = tmp_path / "run"
    proc = start_torchrun([TRAIN, *long_run(tiny, save)])
    metrics = save / "metrics.jsonl"
    wait_for(metrics, proc, ready=has_lines)
    output, seconds = end_after(lambda: (os.remove(metrics), os.mkdir(metrics)), proc)
    print(f"fault to end of job: {seconds:.1f}s")
    assert proc.returncode != 0
    assert seconds < 60, output[-3000:]
    assert "[rank 0] IsADirectoryError" in output
    # torchrun's summary names the root cause from the error file, not "To enable traceback see ..."
    root_cause = output[output.index("Root Cause"):]
    assert "IsADirectoryError" in root_cause, root_cause


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny, tmp_path):
    """A learning rate of 1e9 makes the weights and then the loss blow up. Bad steps are skipped and logged; after
    max_skipped_steps in a row the run stops, naming the first bad step and the last good checkpoint. No
    safetensors file with a non-finite value is ever written, and every checkpoint is finite."""
    save = tmp_path / "run"
    proc = torchrun([TRAIN, *train_args(tiny, save, learning_rate=1e9, max_steps=40, max_epochs=10, save_steps=1,
                                        max_ckpt_num=100, max_skipped_steps=3, logging_steps=1)], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not finite 3 steps in a row" in errors[0], proc.stderr[-3000:]
    assert "Last complete checkpoint:" in errors[0]
    skipped = [m for m in read_metrics(save) if m.get("skipped")]
    assert len(skipped) == 3 and [m["step"] for m in skipped] == list(range(skipped[0]["step"],
                                                                             skipped[0]["step"] + 3))
    from safetensors.torch import load_file

    for path in glob.glob(str(save / "**" / "*.safetensors"), recursive=True):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path
    assert not (save / "config.json").exists()  # no export


def test_guard_counts_only_consecutive_skips():
    from fsdp_kd.run_log import NonFiniteTraining, SkipGuard

    guard = SkipGuard(limit=2, ckpt_path="/nonexistent")
    for step, skipped in ((1, True), (2, False), (3, True), (4, False)):
        guard.update(step, skipped)
    guard.update(5, True)
    with pytest.raises(NonFiniteTraining, match=r"steps 5-6: .* 2 steps in a row .* none"):
        guard.update(6, True)


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs filled up to its last 64 KiB: room for the small per-rank RNG files of a checkpoint but not for
    its shards, so a save fails with ENOSPC halfway, as on a full disk. Needs root to mount (CI runs as root)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the ENOSPC path needs root")
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * (2 * 1024**2 - 64 * 1024))
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_reported_and_loses_nothing(tiny, tmp_path, full_disk):
    """A background save (the synchronous one goes through the same error path, `CheckpointWriter._explained`)."""
    save = tmp_path / "run"
    proc = torchrun([TRAIN, *train_args(tiny, save, max_steps=6, save_steps=2, async_save="true",
                                        ckpt_path=str(full_disk / "ckpt"))], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "CheckpointError: writing checkpoint" in proc.stderr and "MiB free there" in proc.stderr, proc.stderr[-3000:]
    assert "the last complete checkpoint is none" in proc.stderr
    lines = read_metrics(save)  # the run's log is intact and says how far it got
    assert lines and lines[0]["step"] == 1
    assert lines[-1]["step"] <= 4  # a background save's failure stops the run by the next save at the latest
    assert not any(name.startswith("step_") and not name.endswith(".partial")
                   for name in os.listdir(full_disk / "ckpt"))


def test_metric_mirrors_are_closed_as_finished_or_failed(tmp_path, monkeypatch):
    """A W&B run must end as finished or failed, never "crashed" (the ranks leave through os._exit)."""
    import sys
    import types

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.run_log import MetricsLog

    finished = []

    class Run:
        def log(self, values, step):
            pass

        def finish(self, exit_code=0):
            finished.append(exit_code)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: Run()))
    for failed in (False, True):
        log = MetricsLog(str(tmp_path / f"metrics_{failed}.jsonl"), True, None, use_wandb="project",
                         run_config=TrainConfig(pretrain="s", dataset="d", use_wandb="project").to_dict())
        log.write({"step": 1, "loss": 1.0})
        log.close(failed)
        log.close(failed)  # a second close is harmless
    assert finished == [0, 1]
