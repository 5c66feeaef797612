"""The teacher on ranks of its own (`teacher_ranks`): the same run as co-located, a fault on either side ending the
job, and the refusals."""

import glob
import os
import signal

import pytest
import torch

from conftest import (CHAR_CHAT, REPO, end_after, has_lines, python_run, read_metrics, start_torchrun, torchrun,
                      train_args, wait_for)
from fsdp_kd.config import parse_config
from fsdp_kd.errors import ConfigError

TRAIN = str(REPO / "train.py")


def _weights(save_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in glob.glob(os.path.join(save_path, "*.safetensors")):
        out.update(load_file(path))
    return out


def _odd_eval(tiny, tmp_path, n=7) -> str:
    """7 held-out samples over 2 student ranks at micro-batch 1: one rank's last micro-batch is a masked copy, with
    no trained row, so a teacher rank sends back zero hidden states."""
    path = tmp_path / "eval7.jsonl"
    with open(tiny["eval"]) as f:
        path.write_text("".join(f.readlines()[:n]))
    return str(path)


@pytest.mark.parametrize("case", ["untied", "tied_packed", "cross_tokenizer", "privileged"])
def test_teacher_ranks_give_the_co_located_run(tiny, pair_student, pair_teacher, tmp_path, case):
    """1 teacher rank + 2 student ranks train exactly as 2 co-located ranks: per-step losses and metrics, eval
    metrics, and the exported weights, to fp32 tolerance. Micro-batch 1 (3 per rank per step), an eval count that
    does not divide by the ranks; a Llama teacher with an untied head, a Qwen2 teacher with a tied one (its head is
    the embedding) on packed rows, a teacher with its own tokenizer, and the student's initial weights reading a
    system prompt the student does not (`teacher_model: self`, privileged context). The teacher rank says how many micro-batches
    it ran, which must be every one of both student ranks'. The untied case also writes a checkpoint in the
    background at step 2 (DCP and its own gloo group over the student ranks alone)."""
    overrides = dict(micro_train_batch_size=1, train_batch_size=6, max_steps=3, eval_dataset=_odd_eval(tiny, tmp_path),
                     eval_steps=2, logging_steps=1)
    overrides.update({"untied": dict(save_steps=2, async_save="true"),
                      "tied_packed": dict(teacher_model=tiny["qwen_teacher"], packing_samples="true", max_len=64),
                      "cross_tokenizer": dict(pretrain=pair_student, teacher_model=pair_teacher,
                                              cross_tokenizer="true"),
                      "privileged": dict(teacher_model="self", teacher_system_prompt="Translate.",
                                         apply_chat_template="true", tokenizer_chat_template=CHAR_CHAT)}[case])
    co_located, split = tmp_path / "co_located", tmp_path / "split"
    torchrun([TRAIN, *train_args(tiny, co_located, **overrides)], nproc=2)
    proc = torchrun([TRAIN, *train_args(tiny, split, teacher_ranks=1, **overrides)], nproc=3)

    assert "2 student ranks (global ranks 0-1 on " in proc.stdout, proc.stdout[-3000:]
    assert "1 teacher rank (global rank 2 on " in proc.stdout
    assert "teacher loaded and sharded over 1 rank(s)" in proc.stdout
    evals, per_eval = 2, 4  # steps 2 and 3; ceil(7 / 2) micro-batches of 1 on each student rank
    assert f"teacher ranks: served {2 * (3 * 3 + evals * per_eval)} micro-batches per rank" in proc.stdout
    ours, theirs = read_metrics(split), read_metrics(co_located)
    assert [sorted(m) for m in ours] == [sorted(m) for m in theirs]
    for a, b in zip(ours, theirs):
        for key in a:
            if key not in ("tokens_per_sec", "peak_mem_gb", "gen_tokens_per_sec"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    keys = {k for m in ours for k in m}
    assert any(k.startswith("eval_kl") for k in keys) and any(k.startswith("kl") for k in keys), keys
    got, want = _weights(split), _weights(co_located)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if case == "untied":
        assert sorted(os.listdir(split / "checkpoints")) == ["step_2"]


@pytest.mark.parametrize("teachers, students", [(1, 1), (2, 2)])
def test_other_splits_give_the_co_located_run(tiny, tmp_path, teachers, students):
    """1 + 1 ranks against 1 rank alone, and 2 teacher ranks (the teacher FSDP-sharded over them, each serving one
    student rank) + 2 student ranks against 2 co-located ranks: the same losses and weights."""
    overrides = dict(micro_train_batch_size=2, train_batch_size=8, max_steps=2, logging_steps=1)
    co_located, split = tmp_path / "co_located", tmp_path / "split"
    torchrun([TRAIN, *train_args(tiny, co_located, **overrides)], nproc=students)
    proc = torchrun([TRAIN, *train_args(tiny, split, teacher_ranks=teachers, **overrides)],
                    nproc=teachers + students)
    assert f"teacher loaded and sharded over {teachers} rank(s)" in proc.stdout, proc.stdout[-3000:]
    per_teacher_rank = students // teachers * 2 * (8 // (2 * students))  # 2 steps of 8 samples, micro-batch 2
    assert f"teacher ranks: served {per_teacher_rank} micro-batches per rank" in proc.stdout
    for a, b in zip(read_metrics(split), read_metrics(co_located), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5)
    got, want = _weights(split), _weights(co_located)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_split_run_resumes_exactly(tiny, tmp_path):
    """A split run's checkpoint (DCP over the student ranks alone) resumes into the same run: after its last
    checkpoint is deleted, the same command continues from the one before and ends with the same metrics and
    weights as the run that was not resumed."""
    import shutil

    save = tmp_path / "run"
    args = [TRAIN, *train_args(tiny, save, teacher_ranks=1, max_steps=4, save_steps=2, logging_steps=1,
                               load_checkpoint="true", max_ckpt_num=5)]
    torchrun(args, nproc=3)
    metrics, weights = read_metrics(save), _weights(save)
    shutil.rmtree(save / "checkpoints" / "step_4")
    resumed = torchrun(args, nproc=3)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout, resumed.stdout[-3000:]
    timing = ("tokens_per_sec", "peak_mem_gb")
    assert [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(save)] == \
        [{k: v for k, v in m.items() if k not in timing} for m in metrics]
    again = _weights(save)
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)


def _worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of global rank `rank` (a child of the torchrun process)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


def _long_run(tiny, save_path):
    return [TRAIN, *train_args(tiny, save_path, teacher_ranks=1, max_steps=100000, max_epochs=10000,
                               logging_steps=1, teacher_model=tiny["qwen_teacher"])]


def test_a_teacher_rank_killed_mid_run_ends_the_job_within_a_minute(tiny, tmp_path):
    """The teacher rank is killed (SIGKILL, as the OOM killer does) while the student ranks wait for its hidden
    states: torchrun sees it gone and stops the student ranks, blocked in a receive that will never complete."""
    save = tmp_path / "run"
    proc = start_torchrun(_long_run(tiny, save), nproc=3)
    wait_for(save / "metrics.jsonl", proc, ready=has_lines)
    output, seconds = end_after(lambda: os.kill(_worker_pid(proc.pid, 2), signal.SIGKILL), proc)
    print(f"teacher rank killed to end of job: {seconds:.1f}s")
    assert proc.returncode != 0
    assert seconds < 60, output[-3000:]
    assert "rank      : 2" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]


def test_a_student_rank_failing_ends_the_teacher_ranks_too(tiny, tmp_path):
    """Rank 0 alone raises mid-run (metrics.jsonl turned into a directory); the teacher rank, blocked in a receive
    from it, is stopped by torchrun, and the error is said with its rank."""
    save = tmp_path / "run"
    proc = start_torchrun(_long_run(tiny, save), nproc=3)
    metrics = save / "metrics.jsonl"
    wait_for(metrics, proc, ready=has_lines)
    output, seconds = end_after(lambda: (os.remove(metrics), os.mkdir(metrics)), proc)
    assert proc.returncode != 0 and seconds < 60, output[-3000:]
    assert "[rank 0] IsADirectoryError" in output


@pytest.mark.parametrize("flags, message", [
    (dict(teacher_ranks=-1), "teacher_ranks must be >= 0"),
    (dict(teacher_ranks=1, teacher_model=None, kd_coef=0.0), "set teacher_model"),
    (dict(teacher_ranks=1, sharding_strategy="hybrid_shard"), "hybrid_shard is not supported"),
    (dict(teacher_ranks=1, teacher_cache="some_dir"), "no teacher_cache"),
    (dict(teacher_ranks=1, on_policy_ratio=0.5, generate_gather_once="false"), "generate_gather_once true"),
])
def test_teacher_ranks_refusals(tiny, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(train_args(tiny, tmp_path / "out", **flags))


def test_a_teacher_the_ranks_cannot_each_read_is_one_line_before_anything_loads(tiny, tmp_path):
    """A teacher whose safetensors name a tensor otherwise than its model (here the final norm) would need the
    load that broadcasts from global rank 0 over every rank: the student ranks refuse it while checking the teacher's
    head, before the teacher ranks load anything, and it is said once."""
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "renamed_teacher"
    shutil.copytree(tiny["teacher"], teacher)
    weights = load_file(teacher / "model.safetensors")
    weights["model.final_norm.weight"] = weights.pop("model.norm.weight")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    save = tmp_path / "out"
    proc = torchrun([TRAIN, *train_args(tiny, save, teacher_model=str(teacher), teacher_ranks=1)], nproc=3,
                    check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "key teacher_ranks: every rank reads its own shards of the teacher" in errors[0]
    assert "other names or shapes" in errors[0] and "loading the teacher" not in proc.stdout
    assert not (save / "model.safetensors.index.json").exists()


def test_teacher_ranks_that_leave_no_student_rank_are_one_line_before_anything_loads(tiny, tmp_path):
    """A plain `python train.py` is a world of one: teacher_ranks 1 would leave no student rank."""
    save = tmp_path / "out"
    proc = python_run([TRAIN, *train_args(tiny, save, teacher_ranks=1)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: key teacher_ranks: 1 teacher ranks of 1 leave 0 student ranks, which must be a positive "
                      "multiple of 1 (each teacher rank serves as many student ranks as the others); change "
                      "teacher_ranks or --nproc_per_node"], proc.stderr[-2000:]
    assert not save.exists()



@pytest.mark.parametrize("rank, hosts, first", [
    (2, ["a", "a", "a", "a"], True),  # the first teacher rank on a node it shares with the student ranks
    (3, ["a", "a", "a", "a"], False),
    (1, ["a", "a", "a", "a"], False),
    (2, ["a", "a", "b", "b"], True),  # nodes of their own
    (1, ["a", "b", "b", "b"], True),  # a student rank first on its node, beside the teacher ranks
])
def test_each_side_has_one_rank_that_downloads_per_node(rank, hosts, first):
    """A hub model is downloaded once per node by each side: teacher ranks sharing a node with student ranks have
    no local rank 0, yet one of them must fetch the teacher's body there."""
    from fsdp_kd.distributed import DistEnv, Split

    split = Split([0, 1], [2, 3], hosts, None, None)
    env = DistEnv(0, rank, 2, torch.device("cpu"), None, global_rank=rank, split=split)
    assert env.first_on_host is first


def test_an_evaluation_begins_a_steps_worth_of_micro_batches_at_a_time():
    """`Trainer.evaluate` hands the teacher (on ranks of its own: `RemoteTeacher.begin` sends them all at once) and
    the device as many micro-batches at a time as a training step does, not the whole eval set."""
    import types

    from fsdp_kd.data import collate
    from fsdp_kd.records import Sample
    from fsdp_kd.step_metrics import SUMMED
    from fsdp_kd.trainer import Trainer

    begun = []
    trainer = object.__new__(Trainer)
    groups = [[Sample([1, 2, 3], [-100, 3, 4])] for _ in range(7)]
    trainer.cfg = types.SimpleNamespace(micro_train_batch_size=1)
    trainer.env = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    trainer.data = types.SimpleNamespace(eval_groups=lambda *args: groups, collate=lambda s: collate(s, 0),
                                         sampler=types.SimpleNamespace(accumulation=3))
    trainer.teacher = types.SimpleNamespace(begin=lambda batches: begun.append(len(batches)), metric_names={},
                                            metric_groups={})
    trainer.student = types.SimpleNamespace(eval=lambda: None, reshard_everything=lambda: None)
    trainer.spec = None
    trainer._run_micro_batch = lambda batch, spec: (torch.zeros(()), {name: torch.zeros((), dtype=torch.float64)
                                                                      for name in SUMMED[1:]})
    trainer.evaluate()
    assert begun == [3, 3, 1]

