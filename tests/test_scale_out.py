"""Node-shaped layouts on one machine: two torchrun "nodes" × 2 ranks over c10d rendezvous, HSDP, layout changes
across a resume, restarts by torchrun itself."""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, _free_port, read_metrics, torchrun, train_args
from test_checkpoint import child_pids, comparable, resume_args, start_torchrun, wait_for

TRAIN = str(REPO / "train.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def two_nodes(args, port, rdzv_conf="join_timeout=60"):
    """Two torchrun processes, as two nodes of 2 ranks, meeting at a c10d rendezvous on localhost."""
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "kd",
                              "--rdzv_conf", rdzv_conf, *args],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for _ in range(2)]


def finish(nodes, timeout=300):
    outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    return outputs


def losses(save_path):
    return [m["loss"] for m in read_metrics(save_path) if "loss" in m]


def weights(save_path):
    return load_file(save_path / "model-00001-of-00001.safetensors")


@pytest.fixture(scope="module")
def single_process(tiny, tmp_path_factory):
    """The reference: one process, the same global batch of 16 as 4 micro-batches of 4."""
    save = tmp_path_factory.mktemp("single") / "run"
    torchrun([TRAIN, *train_args(tiny, save, max_steps=4)], nproc=1)
    return save


@pytest.mark.parametrize("nodes,strategy", [(2, "full_shard"), (2, "hybrid_shard"), (1, "shard_grad_op")])
def test_sharded_runs_match_one_process(tiny, tmp_path, single_process, nodes, strategy):
    """Two nodes of 2 ranks meeting at a rendezvous, fully sharded or HSDP (2x2); shard_grad_op (the student kept
    gathered from forward to backward) needs no second node, so it runs on one node of 2 ranks."""
    save = tmp_path / "run"
    args = [TRAIN, *train_args(tiny, save, max_steps=4, sharding_strategy=strategy,
                               teacher_sharding_strategy="hybrid_shard" if strategy == "hybrid_shard" else "full_shard")]
    outputs = finish(two_nodes(args, _free_port())) if nodes == 2 else [torchrun(args, nproc=2).stdout]
    assert any(f"world size {2 * nodes}" in out for out in outputs)
    assert losses(save) == pytest.approx(losses(single_process), rel=1e-5)
    ours, reference = weights(save), weights(single_process)
    for name in reference:
        assert torch.allclose(ours[name], reference[name], rtol=1e-4, atol=1e-6), name


def test_hsdp_checkpoint_resumes_under_another_layout(tiny, tmp_path):
    """2 nodes × 2 ranks (HSDP 2×2) saves; 1 node × 2 ranks (full shard) resumes: DCP reshards."""
    save = tmp_path / "run"
    flags = resume_args(tiny, save, max_steps=8, save_steps=4)
    nodes = two_nodes([TRAIN, *flags, "--sharding_strategy", "hybrid_shard"], _free_port())
    deadline = time.time() + 300
    while not (save / "checkpoints" / "step_4").exists():
        assert all(n.poll() is None for n in nodes) and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    for node in nodes:
        for pid in child_pids(node.pid):
            os.kill(pid, 9)
        node.kill()
        node.wait()
    assert not (save / "config.json").exists(), "the run finished before the kill; the test proved nothing"
    resumed = torchrun([TRAIN, *flags], nproc=2)
    assert "resumed from" in resumed.stdout
    reference = tmp_path / "reference"
    torchrun([TRAIN, *resume_args(tiny, reference, max_steps=8, save_steps=4)], nproc=2)
    assert losses(save) == pytest.approx(losses(reference), rel=1e-4)


def test_torchrun_restarts_resume_from_the_last_checkpoint(tiny, tmp_path):
    """`torchrun --max-restarts 1`: a killed rank takes the job down, torchrun starts it again, load_checkpoint
    picks up the newest complete checkpoint, and the run ends as an uninterrupted one does."""
    save = tmp_path / "run"
    flags = resume_args(tiny, save, max_steps=12, save_steps=4)
    proc = start_torchrun(["--max-restarts", "1", TRAIN, *flags])
    wait_for(save / "checkpoints" / "step_4", proc)
    os.kill(child_pids(proc.pid)[0], 9)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    reference = tmp_path / "reference"
    torchrun([TRAIN, *resume_args(tiny, reference, max_steps=12, save_steps=4)], nproc=2)
    assert comparable(read_metrics(save)) == comparable(read_metrics(reference))


def test_a_node_that_never_arrives_times_out(tiny, tmp_path):
    """torchrun's agent waits `join_timeout` seconds at the rendezvous and gives up with RendezvousTimeoutError.
    That happens before any rank starts, so the message is torchrun's own (it does not name the endpoint)."""
    port = _free_port()
    started = time.time()
    lone = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "kd",
                           "--rdzv_conf", "join_timeout=5", TRAIN, *train_args(tiny, tmp_path / "run")],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert lone.returncode != 0 and time.time() - started < 60
    assert "RendezvousTimeoutError" in lone.stderr
    assert not (tmp_path / "run").exists()
