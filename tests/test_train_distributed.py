"""End-to-end under `torchrun --nproc_per_node 2` on gloo, with tiny Llama- and Qwen2-shaped models."""

import pytest
import torch

from conftest import REPO, read_metrics, torchrun, train_args

WORKER = str(REPO / "tests" / "dist_worker.py")
TRAIN = str(REPO / "train.py")


def test_kl_is_zero_when_the_teacher_is_the_student(tiny, tmp_path):
    torchrun([TRAIN, *train_args(tiny, tmp_path / "out", teacher_model=tiny["student"], max_steps=1)])
    first = read_metrics(tmp_path / "out")[0]
    assert abs(first["kl"]) < 1e-6
    assert first["teacher_entropy"] > 1.0  # what a soft-target CE would have logged instead of 0
    assert first["top1_agreement"] == 1.0


def test_loss_and_kl_fall_over_a_short_run(tiny, tmp_path):
    torchrun([TRAIN, *train_args(tiny, tmp_path / "out", max_steps=12, kd_coef=1.0, eval_dataset=tiny["eval"],
                                 eval_steps=6)])
    lines = read_metrics(tmp_path / "out")
    train = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_kl" in m]
    assert len(train) == 12 and len(evals) == 2
    assert sum(m["loss"] for m in train[-3:]) < sum(m["loss"] for m in train[:3])
    assert train[-1]["kl"] < train[0]["kl"]
    assert evals[-1]["eval_kl"] < train[0]["kl"]
    for key in ("step", "loss", "ce", "kl", "teacher_entropy", "lr", "grad_norm", "tokens_per_sec"):
        assert key in train[0]


def _grads(tiny, tmp_path, name, nproc, **flags):
    out = tmp_path / f"{name}.pt"
    torchrun([WORKER, "grads", str(out), *train_args(tiny, tmp_path / name, **flags)], nproc=nproc)
    return torch.load(out, weights_only=True)


def _assert_same_grads(a, b, rtol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        scale = float(b[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale + 1e-9, name


def test_gradients_do_not_depend_on_the_split_into_ranks_and_micro_batches(tiny, tmp_path):
    one_rank = _grads(tiny, tmp_path, "w1", 1, train_batch_size=8, micro_train_batch_size=4)  # 1 rank × 2 accum
    two_ranks = _grads(tiny, tmp_path, "w2", 2, train_batch_size=8, micro_train_batch_size=4)  # 2 ranks × 1
    small = _grads(tiny, tmp_path, "w2m1", 2, train_batch_size=8, micro_train_batch_size=1)  # 2 ranks × 4, mbs 1
    _assert_same_grads(two_ranks["grads"], one_rank["grads"])
    _assert_same_grads(small["grads"], one_rank["grads"])
    assert two_ranks["metrics"]["loss"] == pytest.approx(one_rank["metrics"]["loss"], rel=1e-6)


@pytest.mark.parametrize("teacher", ["teacher", "qwen_teacher"])
def test_each_teacher_parameter_is_gathered_once_per_micro_batch(tiny, tmp_path, teacher):
    """The teacher's forward gathers the root (embeddings, norm) and layers; the loss gathers the head. An untied
    head is its own unit; a tied one is the embedding, kept gathered from the forward until the loss."""
    out = tmp_path / "gathers.pt"
    student = "qwen_student" if teacher.startswith("qwen") else "student"
    torchrun([WORKER, "gathers", str(out), *train_args(tiny, tmp_path / "run", pretrain=tiny[student],
                                                       teacher_model=tiny[teacher])])
    result = torch.load(out, weights_only=True)
    assert result["gathered"] == [result["parameters"]] * 2


def test_offloaded_teacher_gives_the_same_gradients(tiny, tmp_path):
    resident = _grads(tiny, tmp_path, "resident", 2)
    offloaded = _grads(tiny, tmp_path, "offloaded", 2, teacher_offload="true")
    _assert_same_grads(offloaded["grads"], resident["grads"], rtol=1e-6)


def test_fsdp_kernel_matches_the_dense_loss(tiny, tmp_path):
    out = tmp_path / "dense.pt"
    torchrun([WORKER, "dense", str(out), *train_args(tiny, tmp_path / "run", kd_vocab_chunk=7, kd_token_chunk=5)])
    result = torch.load(out, weights_only=True)
    kernel, dense = result["kernel"], result["dense"]
    assert float(kernel["loss"]) == pytest.approx(float(dense["loss"]), rel=1e-5)
    _assert_same_grads(kernel["grads"], dense["grads"])


@pytest.mark.parametrize("family", ["llama", "qwen2_tied"])
def test_exported_model_reproduces_the_fsdp_logits(tiny, tmp_path, family):
    from transformers import AutoModelForCausalLM

    models = {"llama": ("student", "teacher"), "qwen2_tied": ("qwen_student", "qwen_teacher")}[family]
    out, save = tmp_path / "logits.pt", tmp_path / "export"
    torchrun([WORKER, "logits", str(out),
              *train_args(tiny, save, pretrain=tiny[models[0]], teacher_model=tiny[models[1]], max_steps=3)])
    result = torch.load(out, weights_only=True)
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"):
        assert (save / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(save).eval()
    with torch.no_grad():
        logits = model(input_ids=result["input_ids"]).logits
    assert torch.allclose(logits, result["logits"], atol=1e-5, rtol=1e-5)
    initial = AutoModelForCausalLM.from_pretrained(tiny[models[0]]).eval()
    with torch.no_grad():
        assert not torch.allclose(initial(input_ids=result["input_ids"]).logits, logits, atol=1e-3)  # it trained


def test_packing_leaves_the_gradients_unchanged(tiny, tmp_path):
    plain = _grads(tiny, tmp_path, "plain", 2, train_batch_size=8, micro_train_batch_size=4)
    packed = _grads(tiny, tmp_path, "packed", 2, train_batch_size=8, micro_train_batch_size=4,
                    packing_samples="true", max_len=64)
    _assert_same_grads(packed["grads"], plain["grads"])
