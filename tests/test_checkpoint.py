"""Checkpoints that survive a kill: exact resume, atomic saves, rotation, export from a checkpoint, refusals."""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import REPO, python_run, read_metrics, start_torchrun, torchrun, train_args, wait_for

TRAIN = str(REPO / "train.py")
TIMING_KEYS = {"tokens_per_sec", "peak_mem_gb", "gen_tokens_per_sec"}  # measurements of the machine, not of the run


def comparable(lines):
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def resume_args(tiny, save_path, **overrides):
    # 16 steps per epoch: 24 steps cross an epoch boundary, so resuming must also restore the reshuffled order
    flags = dict(max_steps=24, max_epochs=2, save_steps=4, logging_steps=1, load_checkpoint="true", max_ckpt_num=10)
    flags.update(overrides)
    return train_args(tiny, save_path, **flags)


def child_pids(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_everything(proc):
    """SIGKILL the ranks and torchrun itself, as a preemption would (the ranks have process groups of their own)."""
    for pid in child_pids(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref") / "run"
    torchrun([TRAIN, *resume_args(tiny, save)])
    return save


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_killed_rank_then_same_command_resumes_exactly(tiny, tmp_path, uninterrupted, async_save):
    """Against a synchronous uninterrupted run: background saves must capture the same state."""
    save = tmp_path / "run"
    args = [TRAIN, *resume_args(tiny, save, async_save=async_save)]
    proc = start_torchrun(args)
    wait_for(save / "checkpoints" / "step_8", proc)
    workers = child_pids(proc.pid)
    assert len(workers) == 2
    killed_at = time.time()
    os.kill(workers[1], signal.SIGKILL)  # one rank dies; the other must not hang
    proc.wait(timeout=60)
    assert proc.returncode != 0 and time.time() - killed_at < 60
    assert not (save / "config.json").exists(), "the run finished before the kill; the test proved nothing"

    resumed = torchrun(args)
    assert "resumed from" in resumed.stdout
    assert comparable(read_metrics(save)) == comparable(read_metrics(uninterrupted))
    from safetensors.torch import load_file

    final = load_file(save / "model-00001-of-00001.safetensors")
    reference = load_file(uninterrupted / "model-00001-of-00001.safetensors")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)


def test_half_written_checkpoint_is_ignored_and_removed(tiny, tmp_path, uninterrupted):
    save = tmp_path / "run"
    proc = start_torchrun([TRAIN, *resume_args(tiny, save)])
    wait_for(save / "checkpoints" / "step_12", proc)
    kill_everything(proc)
    assert not (save / "config.json").exists(), "the run finished before the kill; the test proved nothing"
    # what a save killed halfway leaves: a .partial directory with some shards and no train state
    partial = save / "checkpoints" / "step_16.partial"
    partial.mkdir(exist_ok=True)
    (partial / "__0_0.distcp").write_bytes(b"\0" * 100)
    # what a rotation killed halfway leaves: the old checkpoint renamed away first, then partly deleted; its train
    # state is still there, and it is newer-looking than the real one, yet it is never loaded
    deleting = save / "checkpoints" / "step_20.deleting"
    deleting.mkdir()
    (deleting / "train_state.json").write_text('{"step": 20}')
    resumed = torchrun([TRAIN, *resume_args(tiny, save)])
    assert "removed incomplete checkpoints" in resumed.stdout and "step_16.partial" in resumed.stdout
    assert "step_20.deleting" in resumed.stdout
    assert f"resumed from {save / 'checkpoints' / 'step_12'}" in resumed.stdout
    assert not partial.exists() and not deleting.exists()
    assert comparable(read_metrics(save)) == comparable(read_metrics(uninterrupted))


def test_rotation_keeps_the_newest_complete_checkpoints(tiny, tmp_path):
    save = tmp_path / "run"
    torchrun([TRAIN, *resume_args(tiny, save, max_steps=8, save_steps=2, max_ckpt_num=2)])
    assert sorted(os.listdir(save / "checkpoints")) == ["step_6", "step_8"]


def test_checkpoint_from_two_ranks_resumes_on_one(tiny, tmp_path, uninterrupted):
    """DCP reshards, so the world size may change; the gradient is the same up to float summation order."""
    save = tmp_path / "run"
    args = [TRAIN, *resume_args(tiny, save)]
    proc = start_torchrun(args)
    wait_for(save / "checkpoints" / "step_8", proc)
    kill_everything(proc)
    single = torchrun(args, nproc=1)
    assert "resumed from" in single.stdout
    ours = [m for m in read_metrics(save) if "loss" in m]
    reference = [m for m in read_metrics(uninterrupted) if "loss" in m]
    assert [m["step"] for m in ours] == list(range(1, 25))
    for a, b in zip(ours, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


def test_resume_refuses_a_config_that_changes_the_run(tiny, tmp_path):
    save = tmp_path / "run"
    torchrun([TRAIN, *resume_args(tiny, save, max_steps=4, save_steps=2)])
    proc = torchrun([TRAIN, *resume_args(tiny, save, max_steps=4, save_steps=2, train_batch_size=8)], check=False)
    assert proc.returncode != 0
    assert "cannot resume, the config differs in train_batch_size (16 -> 8)" in proc.stderr


def test_load_checkpoint_without_any_starts_fresh_then_never_overwrites_that_run(tiny, tmp_path):
    """No checkpoint and an empty save_path: start fresh and say so. The same command again finds no checkpoint
    (none was saved) but an earlier run's outputs: refused, its metrics untouched."""
    save = tmp_path / "run"
    proc = torchrun([TRAIN, *resume_args(tiny, save, max_steps=2, save_steps=-1)])
    assert "no complete checkpoint" in proc.stdout and "starting fresh" in proc.stdout
    before = (save / "metrics.jsonl").read_text()
    again = torchrun([TRAIN, *resume_args(tiny, save, max_steps=2, save_steps=-1)], check=False)
    assert again.returncode != 0
    assert "found no complete checkpoint" in again.stderr and "already holds" in again.stderr
    assert (save / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("nproc", [1, 2])
def test_export_command_matches_the_end_of_training_export(tiny, tmp_path, uninterrupted, nproc):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    checkpoint = uninterrupted / "checkpoints" / "step_24"
    if nproc == 1:
        proc = python_run(["-m", "fsdp_kd.export", str(checkpoint), str(out)], timeout=120)
        assert proc.returncode == 0, proc.stderr
    else:
        torchrun(["-m", "fsdp_kd.export", str(checkpoint), str(out)], nproc=2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        final = AutoModelForCausalLM.from_pretrained(uninterrupted)(input_ids=ids).logits
    assert torch.equal(exported, final)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    partial = tmp_path / "step_3.partial"
    partial.mkdir()
    proc = python_run(["-m", "fsdp_kd.export", str(partial), str(tmp_path / "o")])
    assert proc.returncode == 2 and "not a complete checkpoint" in proc.stderr


def _short_run_on_own_data(tiny, tmp_path):
    """A 2-step run, checkpointed at its end, on a copy of the training data that the test may edit."""
    data = tmp_path / "train.jsonl"
    data.write_text(open(tiny["train"]).read())
    args = [TRAIN, *resume_args(tiny, tmp_path / "run", dataset=str(data), max_steps=2, save_steps=2)]
    torchrun(args)
    return data, args


def test_resume_refuses_training_data_that_changed_since_the_checkpoint(tiny, tmp_path):
    """The data's samples are compared, not its file's name or date: the same bytes rewritten (a new mtime, so it
    is tokenized again) resume; one record edited at the same path is refused, naming the file."""
    data, args = _short_run_on_own_data(tiny, tmp_path)
    text = data.read_text()
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert "resumed from" in torchrun(args).stdout
    first = text.splitlines()[0]
    data.write_text(text.replace(first, first.replace('"input": "', '"input": "a'), 1))
    proc = torchrun(args, check=False)
    assert proc.returncode != 0
    assert (f"cannot resume, the training data {data} changed since the checkpoint" in proc.stderr
            and "restore" in proc.stderr and "new save_path" in proc.stderr), proc.stderr[-2000:]


def test_checkpoint_without_a_data_hash_resumes_with_a_warning(tiny, tmp_path):
    """A train state written before data hashes were recorded: resumed, with one line saying the data is unchecked."""
    import json

    data, args = _short_run_on_own_data(tiny, tmp_path)
    state_file = tmp_path / "run" / "checkpoints" / "step_2" / "train_state.json"
    state = json.loads(state_file.read_text())
    assert "data" in state
    del state["data"]
    state_file.write_text(json.dumps(state))
    proc = torchrun(args)
    assert "resumed from" in proc.stdout
    assert "records no hash of its training data" in proc.stdout
