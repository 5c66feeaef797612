"""No step stalls a GPU: a steady-state micro-batch of every training path makes no host sync of any kind.

The step tests build the real Trainer on the tiny models in this process (a world of one), run a warm-up step, and
run the next one under `profiling.SyncDetector`, which infers on the CPU build where each tensor would live on a
GPU and counts host-to-device copies, device-to-host reads and data-dependent shapes, each with where it happened.
One transfer per step is allowed: the step's metrics reaching the host in `step_metrics.reduce_sums`, after the
last micro-batch.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from conftest import CHAR_CHAT, train_args
from fsdp_kd.testing.profiling import SyncDetector

SMALL = dict(max_len=32, max_samples=16, train_batch_size=4, micro_train_batch_size=2, max_steps=4)  # 2 micro-batches


# ------------------------------------------------------------------------------------------------ the detector
DEVICE = torch.device("cpu")  # the compute device as the code names it: on this build, the CPU


def _masked_assign(w):
    w = w.clone()
    w[w > 0] = 0.0


CAUGHT = {  # what each snippet must be caught as: (kind, operator)
    "torch.tensor(x, device=d)": (lambda w: torch.tensor(3.0, device=DEVICE), "host_to_device", "tensor"),
    "as_tensor(list, device=d)": (lambda w: torch.as_tensor([1.0], device=DEVICE), "host_to_device", "as_tensor"),
    "new_tensor on the device": (lambda w: w.new_tensor([1.0]), "host_to_device", "new_tensor"),
    ".to(d) of host data": (lambda w: torch.arange(4).to(DEVICE), "host_to_device", "to"),
    "from_numpy(...).to(d)": (lambda w: torch.from_numpy(np.ones(4)).to(DEVICE), "host_to_device", "to"),
    "host tensor in a device op": (lambda w: torch.ones(4) + w[0], "host_to_device", "add"),
    "device index from the host": (lambda w: w[torch.tensor([0, 1])], "host_to_device", "index"),
    "copy_ from the host": (lambda w: w.clone().copy_(torch.ones(4, 4)), "host_to_device", "copy_"),
    ".item()": (lambda w: w.sum().item(), "device_to_host", "_local_scalar_dense"),
    "if t.any():": (lambda w: 1 if (w > 0).any() else 0, "device_to_host", "_local_scalar_dense"),
    "a formatted value": (lambda w: f"{w.sum():.2f}", "device_to_host", "_local_scalar_dense"),
    ".tolist()": (lambda w: w.tolist(), "device_to_host", "tolist"),
    ".numpy()": (lambda w: w.numpy(), "device_to_host", "numpy"),
    ".cpu()": (lambda w: w.cpu(), "device_to_host", "cpu"),
    '.to("cpu")': (lambda w: w.to("cpu"), "device_to_host", "to"),
    "copy_ to the host": (lambda w: torch.zeros(4, 4).copy_(w), "device_to_host", "copy_"),
    "nonzero": (lambda w: (w > 0).nonzero(), "dynamic_shape", "nonzero"),
    "boolean-mask indexing": (lambda w: w[w > 0], "dynamic_shape", "index"),
    "boolean-mask assignment": (_masked_assign, "dynamic_shape", "index_put_"),
    "masked_select": (lambda w: w.masked_select(w > 0), "dynamic_shape", "masked_select"),
    "unique": (lambda w: w.unique(), "dynamic_shape", "_unique2"),
    "repeat_interleave by tensor": (lambda w: w[0].long().abs().repeat_interleave(w[1].long().abs()),
                                    "dynamic_shape", "repeat_interleave"),
}


@pytest.mark.parametrize("name", list(CAUGHT))
def test_the_detector_catches_each_kind_of_sync_and_says_where(name):
    snippet, kind, op = CAUGHT[name]
    with SyncDetector() as syncs:
        w = torch.randn(4, 4, device=DEVICE)
        with syncs.counting():
            snippet(w)
    assert [(e.kind, e.op) for e in syncs.events] == [(kind, op)], syncs.report()
    assert syncs.events[0].where.startswith("tests/test_syncs.py:"), syncs.report()


NOT_SYNCS = {  # host work, work that stays on the device, and the transfer that does not stall
    "host data and host reads": lambda w: torch.tensor([3, 1, 2]).sort().values.tolist(),
    "a host draw read on the host": lambda w: bool(torch.rand(1) < 0.5),
    "nonzero on the host": lambda w: (torch.arange(4) > 1).nonzero(),
    'a tensor the code puts on "cpu"': lambda w: torch.zeros(2, device="cpu").tolist(),
    "a factory on the device": lambda w: torch.full((), 3.0, device=DEVICE) * w,
    "a host scalar in a device op": lambda w: torch.tensor(2.0) * w,
    "an asynchronous move": lambda w: torch.arange(4).to(DEVICE, non_blocking=True).float() @ w,
    "repeat_interleave with output_size": lambda w: torch.arange(4, device=DEVICE).repeat_interleave(
        torch.ones(4, dtype=torch.long, device=DEVICE), output_size=4),
    "an empty tensor on the device": lambda w: torch.tensor([], device=DEVICE),
}


@pytest.mark.parametrize("name", list(NOT_SYNCS))
def test_the_detector_lets_host_work_and_asynchronous_copies_be(name):
    with SyncDetector() as syncs:
        w = torch.randn(4, 4, device=DEVICE)
        with syncs.counting():
            NOT_SYNCS[name](w)
    assert syncs.events == [], syncs.report()


def test_the_detector_counts_only_inside_counting_and_learns_places_before():
    """Placements made during warm-up hold while counting: the optimizer's step counters are host tensors whose
    `.item()` is no sync."""
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param])
    with SyncDetector() as syncs:
        param.grad = torch.ones(3, device=DEVICE)
        optimizer.step()  # creates the step counters, uncounted
        param.grad.sum().item()  # uncounted
        with syncs.counting():
            optimizer.step()
    assert syncs.events == [], syncs.report()


# ------------------------------------------------------------------------------------------ what the model is given
def _sample(n: int):
    from fsdp_kd.records import Sample

    return Sample(list(range(3, 3 + n)), list(range(4, 4 + n)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_padded_batch_gets_the_hidden_states_of_hfs_own_padding_mask(tiny, attn):
    """sdpa and eager get a prebuilt 4-D mask (HF passes it through without reading it); at every real position
    the hidden states are those HF computes from the plain 2-D padding mask."""
    from transformers import AutoModelForCausalLM

    from fsdp_kd.data import collate

    lm = AutoModelForCausalLM.from_pretrained(tiny["student"], attn_implementation=attn).eval()
    batch = collate([_sample(5), _sample(3), _sample(7)], pad_id=0)
    inputs = batch.model_inputs(attn, torch.float32)
    assert inputs["attention_mask"].dim() == 4
    with torch.no_grad():
        ours = lm.base_model(**inputs).last_hidden_state
        theirs = lm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def test_flash_attention_reads_the_sample_boundaries_from_the_host():
    """Flash attention gets the rows flattened into sequences, each sample and each row's padding one of its own,
    as numbers the host computed: the varlen kernel then needs no boundaries derived from the device per layer."""
    from fsdp_kd.data import collate, collate_packed

    samples = [_sample(5), _sample(6), _sample(2)]
    packed = collate_packed(samples, 8, pad_id=0)  # rows [6, 2] and [5, 3 padding]
    unpacked = collate(samples, pad_id=0)  # rows of 6: [5, 1 padding], [6], [2, 4 padding]
    for batch, starts in ((packed, [0, 6, 8, 13, 16]), (unpacked, [0, 5, 6, 12, 14, 18])):
        inputs = batch.model_inputs("flash_attention_2", torch.bfloat16)
        assert "attention_mask" not in inputs
        assert inputs["cu_seq_lens_q"].tolist() == inputs["cu_seq_lens_k"].tolist() == starts
        assert inputs["cu_seq_lens_q"].dtype == torch.int32
        assert inputs["max_length_q"] == inputs["max_length_k"] == 6


# --------------------------------------------------------------------------------------------- the training step
@pytest.fixture(scope="module")
def env():
    """A world of one in this process, torn down (and its environment variables restored) after the module."""
    from fsdp_kd.distributed import init_distributed, teardown

    saved = dict(os.environ)
    env = init_distributed()
    yield env
    teardown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """Records of 16 lengths, so every micro-batch has padding (the tiny translation task's samples are all alike)."""
    from fsdp_kd.testing.tiny import SOURCE_LETTERS, TARGET_LETTERS, write_jsonl

    rng = random.Random(0)
    path = str(tmp_path_factory.mktemp("uneven") / "train.jsonl")
    write_jsonl(path, [{"input": "".join(rng.choices(SOURCE_LETTERS, k=n)) + ":",
                        "output": "".join(rng.choices(TARGET_LETTERS, k=3))} for n in range(1, 17)])
    return path


@pytest.fixture(scope="module")
def cache(tiny, uneven, env, tmp_path_factory) -> str:
    """A top-k cache of the tiny teacher over the uneven data, built in this process."""
    from fsdp_kd.cache_teacher import CacheBuilder
    from fsdp_kd.config import parse_config

    root = tmp_path_factory.mktemp("cache")
    flags = {**SMALL, "dataset": uneven, "teacher_cache": str(root / "cache"), "cache_k": 8}
    CacheBuilder(parse_config(train_args(tiny, root / "unused", **flags)), env).run()
    return flags["teacher_cache"]


def trainer_for(tiny, path, env, **overrides):
    from fsdp_kd.config import parse_config
    from fsdp_kd.distributed import seed_everything
    from fsdp_kd.trainer import Trainer

    cfg = parse_config(train_args(tiny, path, **{**SMALL, **overrides}))
    seed_everything(cfg.seed, env.rank)
    return Trainer(cfg, env, log=lambda *a, **k: None)


def steady_state_syncs(trainer, run) -> SyncDetector:
    """`run(trainer, step)` once to warm up, then once more under the detector, counting."""
    with SyncDetector() as syncs:
        run(trainer, 0)
        with syncs.counting():
            run(trainer, 1)
    return syncs


def train_step(trainer, step):
    trainer.train_step(step)


def evaluate(trainer, step):
    trainer.evaluate()


def metrics_read(sync) -> bool:
    """The step's one allowed transfer: its metrics reaching the host, after the last micro-batch."""
    return sync.kind == "device_to_host" and sync.where.endswith(" reduce_sums")


def assert_only_the_metrics_read(syncs: SyncDetector, also=lambda sync: False) -> None:
    print(syncs.report())
    assert [metrics_read(e) for e in syncs.events].count(True) == 1, syncs.report()
    assert [e for e in syncs.events if not (metrics_read(e) or also(e))] == [], syncs.report()


PATHS = {  # name: (train.py flags over SMALL, what runs); a dataset or teacher_cache of None: the fixture's
    "train": ({"dataset": None}, train_step),
    "eager": ({"dataset": None, "attn_implementation": "eager"}, train_step),
    "packed": ({"dataset": None, "packing_samples": True}, train_step),
    "eager_packed": ({"dataset": None, "packing_samples": True, "attn_implementation": "eager"}, train_step),
    "no_teacher": ({"dataset": None, "teacher_model": None, "kd_coef": 0.0}, train_step),
    "offloaded_teacher": ({"dataset": None, "teacher_offload": True}, train_step),
    "cached_teacher": ({"dataset": None, "teacher_model": None, "teacher_cache": None}, train_step),
    # a teacher run on its own tokens (here the same tokenizer's, which takes the same path as another's)
    "cross_tokenizer": ({"dataset": None, "cross_tokenizer": True}, train_step),
    "cross_tokenizer_packed": ({"dataset": None, "cross_tokenizer": True, "packing_samples": True}, train_step),
    # the student's initial weights reading a system prompt of their own: the teacher on its own rows (privileged;
    # max_len 64 keeps the rendered samples whole, so that every micro-batch still has padding)
    "privileged": ({"dataset": None, "teacher_model": "self", "teacher_system_prompt": "Translate.",
                    "apply_chat_template": True, "tokenizer_chat_template": CHAR_CHAT, "max_len": 64}, train_step),
    # ... and another's (the pair student: groups of several tokens, the span term)
    "cross_tokenizer_groups": ({"dataset": None, "cross_tokenizer": True, "pretrain": None}, train_step),
    # ... with its pair tokens in their first character's bucket (prefix buckets: log-sum-exps per bucket)
    "cross_tokenizer_prefix": ({"dataset": None, "cross_tokenizer": True, "pretrain": None, "prefix_buckets": True},
                               train_step),
    "eval": ({"dataset": None, "eval_holdout_ratio": 0.5}, evaluate),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_steady_state_micro_batch_makes_no_host_sync(tiny, uneven, tmp_path, env, request, path):
    overrides, run = PATHS[path]
    fixtures = {"dataset": lambda: uneven, "teacher_cache": lambda: request.getfixturevalue("cache"),
                "pretrain": lambda: request.getfixturevalue("pair_student")}
    overrides = {k: fixtures[k]() if v is None and k in fixtures else v for k, v in overrides.items()}
    assert_only_the_metrics_read(steady_state_syncs(trainer_for(tiny, tmp_path / "run", env, **overrides), run))


def test_a_step_that_checks_for_a_stop_signal_between_micro_batches_makes_no_device_sync(tiny, uneven, tmp_path,
                                                                                          env):
    """A grace period shorter than a step turns on the check between micro-batches (`preemption.MidStepCheck`) once
    a step is measured: its messages are host tensors on a Gloo group, so the device is never waited for."""
    trainer = trainer_for(tiny, tmp_path / "run", env, dataset=uneven, preempt_grace_s=1e-6)
    with SyncDetector() as syncs:
        for step in range(2):  # the first step's time rides in the second step's counts
            trainer.train_step(step)
        assert trainer.mid_step is not None
        with syncs.counting():
            trainer.train_step(2)
    assert_only_the_metrics_read(syncs)


def test_an_on_policy_step_syncs_only_while_generating(tiny, uneven, tmp_path, env):
    """The micro-batch trained on the student's responses makes no sync. Generation syncs a few times per step,
    never per token: the responses reach the host once at the end, to be collated, and the prefill forward makes
    transformers' own few (StaticCache's length counter copied to the device once per layer, one read of the left
    padding in the prefill's mask); the stop flags are read every generate_stop_check_every tokens (here never: 6 <
    16). A sync per token would add at least one per decode forward (5 here)."""
    trainer = trainer_for(tiny, tmp_path / "run", env, dataset=uneven, on_policy_ratio=1.0,
                          generate_max_new_tokens=6)
    syncs = steady_state_syncs(trainer, train_step)
    read = [e for e in syncs.events if re.search(r"fsdp_kd/on_policy\.py:\d+ generate\)?$", e.where)]
    prefill = [e for e in syncs.events if re.search(r"fsdp_kd/decode\.py:\d+ _forward\)?$", e.where)]
    assert [e.op for e in read] == ["tolist"], syncs.report()
    assert len(prefill) <= trainer.student.lm.config.num_hidden_layers + 1, syncs.report()
    assert_only_the_metrics_read(syncs, also=lambda e: e in read + prefill)


def test_a_micro_batch_without_padding_or_packing_reads_once_per_forward_to_keep_sdpa_flash(tiny, tmp_path, env):
    """The one deliberate sync: rows of equal length get no mask, so sdpa runs its flash kernel with is_causal,
    and HF reads the position ids once per forward (student and teacher) to learn there is no packing."""
    trainer = trainer_for(tiny, tmp_path / "run", env)  # the translation task: its samples are all alike
    micro_batches = [trainer.data.collate(samples) for samples in trainer.data.step_samples(1)]
    assert not any(batch.padded for batch in micro_batches)
    syncs = steady_state_syncs(trainer, train_step)
    forwards = [e for e in syncs.events if e.op == "_local_scalar_dense" and
                e.where.startswith("transformers/masking_utils.py") and " find_packed_sequence_indices " in e.where]
    assert len(forwards) == 2 * len(micro_batches), syncs.report()
    assert_only_the_metrics_read(syncs, also=lambda e: e in forwards)


# ---------------------------------------------------------------------------------------- the offloaded teacher
def test_only_parameters_are_offloaded_buffers_stay_on_the_compute_device(tiny):
    """Reading shards onto the host (an offloaded teacher) leaves the buffers where they were and as they were: on
    the compute device. Here the parameters go to the meta device, so a buffer that followed them would show."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_kd.loading import Checkpoint, _read_own_shards, parameters_on_meta, safetensors_index
    from fsdp_kd.sharding import ShardedCausalLM

    config = AutoConfig.from_pretrained(tiny["teacher"])
    with parameters_on_meta():
        root = ShardedCausalLM(AutoModelForCausalLM.from_config(config))
    expected = {name: b.clone() for name, b in AutoModelForCausalLM.from_config(config).named_buffers()}
    _read_own_shards(root, Checkpoint(safetensors_index(tiny["teacher"])), torch.float32, torch.device("meta"))
    assert {p.device.type for p in root.parameters()} == {"meta"}
    buffers = dict(root.lm.named_buffers())
    assert buffers.keys() == expected.keys() and buffers
    for name, buffer in buffers.items():
        assert buffer.device.type == "cpu" and torch.equal(buffer, expected[name]), name


def test_a_caches_targets_reach_the_loss_in_fp32_under_bf16_compute(tiny, uneven, tmp_path, env, cache, monkeypatch):
    """FSDP casts every floating tensor among the student root's forward arguments to the compute dtype; the
    teacher's targets ride outside them (`distill.run_student`), so a cache's log-probabilities reach the loss in
    fp32 under bf16 compute, not rounded to bf16."""
    import torch

    import fsdp_kd.distill as distill

    seen, real = [], distill.loss_against

    def spy(hidden, head, labels, spec, vocab_size, targets):
        seen.append((hidden.dtype, targets.log_p.dtype, targets.log_rest.dtype))
        return real(hidden, head, labels, spec, vocab_size, targets)

    monkeypatch.setattr(distill, "loss_against", spy)
    trainer = trainer_for(tiny, tmp_path / "run", env, dataset=uneven, teacher_model=None, teacher_cache=cache,
                          param_dtype="bf16")
    trainer.train_step(0)
    assert seen and all(dtypes == (torch.bfloat16, torch.float32, torch.float32) for dtypes in seen), seen
