"""A run's set-up before its first step, where the config becomes the pieces the training loop works with.

The order is deliberate: everything that can reject the run cheaply (paths, output directory, tokenizers, data,
checkpoint compatibility, the teacher's own checks: `preflight`) happens before either model is loaded
(`load_models`), which ends with the start-up summary. What the run reports and how it says it is `run_log`; what
the teacher is, `teacher.TEACHERS`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoConfig, PreTrainedTokenizerBase

from . import checkpoint as ckpt
from .config import TrainConfig, config_to_yaml, gradient_accumulation_steps, loss_spec
from .data import StepSampler
from .distributed import DistEnv, barrier
from .dtypes import resolve_dtype
from .heads import probe_head
from .loading import LoadSpec, load_sharded
from .loss import LossSpec
from .on_policy import GenerationSettings, OnPolicy, stop_token_ids
from .preflight import check_packing, check_paths, checkpoint_to_resume, data_spec, open_training_data, run_paths
from .run_data import RunData
from .run_log import METRICS_FILE, MetricsLog, check_logger_packages
from .sharding import ShardedCausalLM, StudentSharding, parameter_count
from .startup import CLOCK
from .routed_teacher import open_teachers
from .routing import routed_tokens
from .teacher import Teacher
from .teacher_ranks import students_checked
from .tokenizer_compat import padding_id, student_tokenizer

CONFIG_FILE = "train_config.yaml"


@dataclass
class Preflight:
    """What the cheap checks leave for the models and the loop: the student's tokenizer, the teacher (checked, not
    loaded), the data, the step counts, and the checkpoint to resume with the training data's fingerprint."""
    tokenizer: PreTrainedTokenizerBase
    teacher: Teacher
    data: RunData
    accumulation: int
    total_steps: int
    resume_from: str | None
    training_data: list[dict]


def preflight(cfg: TrainConfig, env: DistEnv, log) -> Preflight:
    """Every cheap check, on every rank alike, before any model is loaded; then the output directory and its
    config file."""
    check_paths(run_paths(cfg))
    check_packing(run_paths(cfg), cfg.packing_samples)
    accumulation = gradient_accumulation_steps(cfg, env.world_size)
    check_logger_packages(cfg.use_tensorboard, cfg.use_wandb)
    resume_from = checkpoint_to_resume(run_paths(cfg), cfg.load_checkpoint, cfg.to_dict())

    tokenizer = student_tokenizer(cfg.pretrain, cfg.trust_remote_code, cfg.tokenizer_chat_template,
                                  cfg.apply_chat_template)
    teacher = open_teachers(cfg, tokenizer)  # live, cache, ... or none (teacher.TEACHERS), or several routed
    CLOCK.lap("tokenizers")

    opened = open_training_data(data_spec(cfg), env, tokenizer, log, teacher.retokenize)
    if resume_from:
        ckpt.check_same_data(resume_from, opened.fingerprint, log)
    sampler = StepSampler(opened.order, cfg.micro_train_batch_size, env.rank, env.world_size, accumulation)
    total_steps = sampler.steps_per_epoch * cfg.max_epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    data = RunData(opened.train, opened.held_out, opened.order, sampler, padding_id(tokenizer), cfg.packing_samples,
                   cfg.max_len, routed_tokens(cfg, teacher.retokenize))
    data.report_padding(total_steps, log)
    CLOCK.lap("data")
    teacher.check(tokenizer, opened.sources, env)
    if env.split is not None:  # last: the teacher ranks (every block of them) start loading once it has passed
        students_checked(env.split)

    barrier()  # every rank has checked save_path before rank 0 writes into it
    if env.is_main:
        os.makedirs(cfg.save_path, exist_ok=True)
        removed = ckpt.remove_partial_checkpoints(cfg.resolved_ckpt_path())
        if removed:
            log(f"removed incomplete checkpoints left by an interrupted save: {', '.join(removed)}")
        with open(os.path.join(cfg.save_path, CONFIG_FILE), "w") as f:  # never a run's: checked above
            f.write(config_to_yaml(cfg))
    if cfg.print_config:
        log("resolved config:\n" + config_to_yaml(cfg).rstrip())
    return Preflight(tokenizer, teacher, data, accumulation, total_steps, resume_from, opened.fingerprint)


@dataclass
class Models:
    """The loaded student and what trains it: the optimizer and the step it resumes at, the loss's settings (and
    those of on-policy micro-batches, which `on_policy` chooses and rewrites), and where the run writes."""
    student: ShardedCausalLM
    optimizer: torch.optim.Optimizer
    start_step: int
    spec: LossSpec
    on_policy: OnPolicy | None
    on_policy_spec: LossSpec
    checkpoints: ckpt.CheckpointWriter
    metrics_log: MetricsLog
    export_config: object


def load_models(cfg: TrainConfig, env: DistEnv, ready: Preflight, log) -> Models:
    """The student (fp32 master weights) and the teacher (what it runs on this rank, in the compute dtype), each
    head checked against its model's own forward; the optimizer, resumed from the checkpoint if there is one; the
    run's writers; and the start-up summary."""
    teacher, vocab_size = ready.teacher, ready.teacher.vocab_size
    compute_dtype = resolve_dtype(cfg.param_dtype, env.device)
    export_config = AutoConfig.from_pretrained(cfg.pretrain, trust_remote_code=cfg.trust_remote_code)
    student = load_sharded(cfg.pretrain, LoadSpec.of(cfg), env, torch.float32, StudentSharding.of(cfg), "student",
                           vocab_size)
    teacher.load(env, compute_dtype)
    CLOCK.lap("models")
    probe_head(student, "student", vocab_size, env.device)
    teacher.verify(env.device)
    CLOCK.lap("head probes")
    spec = loss_spec(cfg, **({} if teacher.distills else {"kd_coef": 0.0}))
    on_policy, on_policy_spec = None, spec
    if cfg.on_policy_ratio > 0:
        on_policy = _on_policy(cfg, env, ready, log)
        on_policy_spec = dataclasses.replace(spec, ce_coef=None if cfg.on_policy_ce else 0.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas,
                                  weight_decay=cfg.l2)
    start_step = 0
    if cfg.load_checkpoint:
        if ready.resume_from:
            start_step = ckpt.load_checkpoint(student, optimizer, ready.resume_from, env.rank)
            log(f"resumed from {ready.resume_from} at step {start_step}")
        else:
            log(f"load_checkpoint: no complete checkpoint in {cfg.resolved_ckpt_path()} and no earlier outputs in "
                "save_path; starting fresh")
    checkpoints = ckpt.CheckpointWriter(cfg.resolved_ckpt_path(), cfg.max_ckpt_num, cfg.to_dict(), env.rank,
                                        cfg.async_save, ready.training_data, cfg.dist_timeout_minutes)
    metrics_log = MetricsLog(os.path.join(cfg.save_path, METRICS_FILE), env.is_main,
                             start_step if cfg.load_checkpoint else None, cfg.use_tensorboard, cfg.use_wandb,
                             cfg.to_dict())
    log("\n".join("  " + line for line in _summary(cfg, env, ready, student, spec, compute_dtype)))
    return Models(student, optimizer, start_step, spec, on_policy, on_policy_spec, checkpoints, metrics_log,
                  export_config)


def _on_policy(cfg: TrainConfig, env: DistEnv, ready: Preflight, log) -> OnPolicy:
    settings = GenerationSettings(cfg.generate_max_new_tokens, cfg.generate_temperature, cfg.generate_top_p,
                                  stop_token_ids(ready.tokenizer, _generation_config(cfg.pretrain)),
                                  cfg.max_len, ready.data.pad_id, cfg.generate_gather_once, ready.teacher.vocab_size,
                                  cfg.generate_stop_check_every, cfg.generate_compile)
    log(f"on-policy: {cfg.on_policy_ratio:.0%} of micro-batches train on the student's own responses "
        f"(up to {cfg.generate_max_new_tokens} tokens, temperature {cfg.generate_temperature:g}, top-p "
        f"{cfg.generate_top_p:g}, stop ids {list(settings.stop_ids)}; student "
        f"{'gathered once per generate' if cfg.generate_gather_once else 're-gathered per token'}"
        f"{', decoding compiled' if cfg.generate_compile else ''}; CE "
        f"{'on' if cfg.on_policy_ce else 'off'} there)")
    return OnPolicy(cfg.on_policy_ratio, cfg.seed, settings, env.rank, env.device, ready.teacher.retokenize)


def _summary(cfg: TrainConfig, env: DistEnv, ready: Preflight, student: ShardedCausalLM, spec: LossSpec,
             compute_dtype: torch.dtype) -> list[str]:
    """The start-up summary's lines: where it runs, the student, the teacher (its own lines), the batch, the loss."""
    seq_tokens = float(ready.data.train.lengths.mean())
    return [
        f"world size {env.world_size} on {env.device.type} "
        f"({dist.get_backend() if dist.is_initialized() else 'single'})",
        f"student {parameter_count(student) / 1e6:.2f}M params: FSDP2 full shard, compute {compute_dtype}, fp32 "
        "master weights and gradient reduction, activation checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}",
        *ready.teacher.describe(),
        f"batch: {cfg.train_batch_size} sequences/step (~{cfg.train_batch_size * seq_tokens:.0f} tokens) = "
        f"{cfg.micro_train_batch_size} micro × {ready.accumulation} accumulation × {env.world_size} ranks",
        f"steps: {ready.total_steps} ({ready.data.sampler.steps_per_epoch}/epoch); loss: "
        + (f"{1 - spec.kd_coef:g}·CE + {spec.kd_coef:g}·{cfg.kd_loss} (τ={cfg.kd_temperature:g})"
           if ready.teacher.distills else "CE (no teacher: plain SFT)"),
    ]


def _generation_config(path: str):
    """The student's generation_config.json (its EOS ids), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
