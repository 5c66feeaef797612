"""The training loop: one optimizer step = accumulate micro-batches, clip, step, log; that is all.

Order of work at start is deliberate: everything that can reject the run cheaply (paths, output directory,
tokenizers, data, checkpoint compatibility) happens before either model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import time
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from transformers import AutoConfig

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, config_to_yaml, gradient_accumulation_steps
from .data import (Concatenated, EpochOrder, MicroBatch, Rows, SampleTable, StepSampler, collate, collate_packed,
                   eval_shards, padding_efficiency, to_device)
from .records import Sample, check_data_path, looks_local
from .tokenized import open_sources
from .distill import setup_teacher, student_loss
from .distributed import DistEnv, all_gather_object, all_reduce_sum
from .export import export_student
from .loss import METRIC_NAMES, LossSpec
from .on_policy import GenerationSettings, GenerationStats, OnPolicy, stop_token_ids
from .heads import verify_head
from .startup import CLOCK
from .models import (ShardedCausalLM, check_model_dir, load_sharded, padding_id, parameter_count, resolve_dtype,
                     shard_student, tokenizer_or_error)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.yaml"
# summed over tokens, micro-batches and ranks, then divided by "tokens"
_SUMMED = ("loss",) + METRIC_NAMES + ("tokens",)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio·lr (or constant). A pure function of the step, so a resumed
    run needs no scheduler state to continue exactly."""
    warmup = math.ceil(cfg.lr_warmup_ratio * total_steps)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_scheduler == "constant_with_warmup":
        return cfg.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.min_lr_ratio * cfg.learning_rate
    return floor + (cfg.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    metrics: dict[str, float]
    real_tokens: int
    skipped: bool = False  # the loss or the gradient norm was not finite: no optimizer update


@dataclass
class StepWork:
    """What a step's forward and backward passes leave for the optimizer step and the log."""
    sums: torch.Tensor  # summed metrics, ordered as _SUMMED, on the device
    on_policy_sums: torch.Tensor  # those of the on-policy micro-batches alone
    micro_batches: list[MicroBatch]
    generation: GenerationStats


def _on_policy_metrics(metrics: dict, kl_on: float, tokens_on: float, on_batches: float, batches: float,
                       sequences: float, generated: float, seconds: float, world_size: int) -> dict[str, float]:
    """The on-policy share of micro-batches, what generation did, and the KL on and off the student's own text."""
    out = {"on_policy_share": on_batches / max(batches, 1.0),
           "generated_len": generated / max(sequences, 1.0),
           "gen_tokens_per_sec": generated / max(seconds / world_size, 1e-9) if generated else 0.0}
    kl_key = next((k for k in ("kl", "kl_buckets", "kl_estimate") if k in metrics), None)
    if kl_key is not None:
        tokens_off = metrics["tokens"] - tokens_on
        if tokens_on:
            out["kl_on_policy"] = kl_on / tokens_on
        if tokens_off:
            out["kl_off_policy"] = (metrics[kl_key] * metrics["tokens"] - kl_on) / tokens_off
    return out


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm; raised alike on every rank."""
    same_on_every_rank = True


class SkipGuard:
    """Counts consecutive skipped (non-finite) steps and stops the run when there are too many.

    A single bad batch is skipped and training goes on; a run that keeps producing NaN or inf has diverged, and
    going on would only burn GPU hours, so it stops and points at the last checkpoint written before the first
    bad step (checkpoints are only written from finite weights)."""

    def __init__(self, limit: int, ckpt_path: str):
        self.limit, self.ckpt_path = limit, ckpt_path
        self.in_a_row, self.first_bad = 0, None

    def update(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row, self.first_bad = 0, None
            return
        self.in_a_row += 1
        self.first_bad = self.first_bad or step
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"steps {self.first_bad}-{step}: the loss or gradient norm was not finite {self.in_a_row} steps in a "
                f"row (max_skipped_steps {self.limit}), so the run stopped; those steps did not update the weights. "
                f"Last complete checkpoint: {ckpt.latest_checkpoint(self.ckpt_path)}. Lower learning_rate or "
                "check the data, then resume with --load_checkpoint")


def check_logger_packages(cfg: TrainConfig) -> None:
    """Asked-for loggers must be importable; said before any heavy work."""
    import importlib.util

    for key, module, extra in (("use_tensorboard", "tensorboard", "tensorboard"), ("use_wandb", "wandb", "wandb")):
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"key {key}: the {module} package is not installed; pip install {extra} "
                              f"(or drop --{key})")


class MetricsLog:
    """metrics.jsonl on rank 0, mirrored to TensorBoard and W&B when asked. On resume, lines past the resumed step
    are dropped so the file reads as one run."""

    def __init__(self, path: str, enabled: bool, resume_step: int | None, cfg: TrainConfig):
        self.path, self.enabled = path, enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)
        if cfg.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(cfg.use_tensorboard)
        if cfg.use_wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.use_wandb, config=cfg.to_dict(), resume="allow")

    def close(self, failed: bool) -> None:
        """Flushes and ends the mirrors, so a W&B run ends as finished or failed rather than "crashed"."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])


def _hold_out(table: SampleTable, ratio: float, seed: int) -> tuple[Rows, Rows]:
    """(train, held out): a seeded share of the table's rows, at least one, set aside for evaluation."""
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed)).numpy()
    cut = max(1, int(len(table) * ratio))
    return Rows(table, order[cut:]), Rows(table, order[:cut])


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, log=print):
        self.cfg, self.env = cfg, env
        self.log = log if env.is_main else (lambda *a, **k: None)
        self._preflight()
        self._load_models()
        CLOCK.lap("optimizer and logs")

    # ----------------------------------------------------------------------------------------------- setup
    def _preflight(self) -> None:
        """Every cheap check, on every rank alike, before any model is loaded."""
        cfg, env = self.cfg, self.env
        for key in ("pretrain", "teacher_model"):
            path = getattr(cfg, key)
            if path and looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
                raise ConfigError(f"key {key}: model directory not found: {path}")
            if path and os.path.isdir(os.path.expanduser(path)):
                check_model_dir(os.path.expanduser(path), key, cfg.trust_remote_code)
        for path in cfg.dataset.split(","):
            check_data_path(path, "dataset")
        if cfg.eval_dataset:
            check_data_path(cfg.eval_dataset, "eval_dataset")
        self.accumulation = gradient_accumulation_steps(cfg, env.world_size)
        check_logger_packages(cfg)

        for key, path in (("save_path", cfg.save_path), ("ckpt_path", cfg.resolved_ckpt_path())):
            if os.path.exists(path) and not os.path.isdir(path):
                raise ConfigError(f"key {key}: {path} is a file, not a directory; choose a directory path")
        self.resume_from = None
        found = ckpt.complete_checkpoints(cfg.resolved_ckpt_path()) if cfg.load_checkpoint else []
        if found:
            self.resume_from = found[-1][1]
            ckpt.check_resumable(self.resume_from, cfg)
        elif _holds_a_run(cfg.save_path):
            why = (f"--load_checkpoint found no complete checkpoint in {cfg.resolved_ckpt_path()} to resume, and "
                   if cfg.load_checkpoint else "")
            raise ConfigError(f"key save_path: {why}{cfg.save_path} already holds a model or metrics from an earlier "
                              "run; choose a new save_path" + ("" if cfg.load_checkpoint else
                                                              ", or pass --load_checkpoint to resume that run"))

        self.tokenizer = tokenizer_or_error(cfg.pretrain, "pretrain", cfg, cfg.tokenizer_chat_template)
        self.pad_id = padding_id(self.tokenizer)
        self.teacher_setup = setup_teacher(cfg, self.tokenizer)  # live, cache or none (distill.TEACHER_SOURCES)
        self.vocab_size = self.teacher_setup.vocab_size
        CLOCK.lap("tokenizers")

        self.train_samples, self.eval_samples = self._load_data()
        if self.resume_from:
            ckpt.check_same_data(self.resume_from, self.training_data, self.log)
        self.teacher_setup.check(self.tokenizer, self.sources)
        self.sampler = StepSampler(self.epoch_order, cfg, env.rank, env.world_size, self.accumulation)
        self.total_steps = self.sampler.steps_per_epoch * cfg.max_epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._report_padding()
        CLOCK.lap("data")

        if dist.is_initialized():
            dist.barrier()  # every rank has checked save_path before rank 0 writes into it
        if env.is_main:
            os.makedirs(cfg.save_path, exist_ok=True)
            removed = ckpt.remove_partial_checkpoints(cfg.resolved_ckpt_path())
            if removed:
                self.log(f"removed incomplete checkpoints left by an interrupted save: {', '.join(removed)}")
            with open(os.path.join(cfg.save_path, CONFIG_FILE), "w") as f:  # never a run's: checked above
                f.write(config_to_yaml(cfg))
        if cfg.print_config:
            self.log("resolved config:\n" + config_to_yaml(cfg).rstrip())

    def _load_data(self) -> tuple[SampleTable, list[Sample]]:
        """The training table (one source, or several under an interleaved `EpochOrder`) and the held-out samples.
        Each source is tokenized once per node into the cache and read memory-mapped (`tokenized`)."""
        cfg = self.cfg
        sources, eval_source = open_sources(cfg, self.tokenizer, self.env.local_rank, all_gather_object, self.log)
        self.training_data = ckpt.data_fingerprint(sources)
        self.sources = sources + ([eval_source] if eval_source is not None else [])
        held_out: list[Sample] = []
        if eval_source is not None:
            held_out = [eval_source[i] for i in range(len(eval_source))]
        elif cfg.eval_holdout_ratio > 0:
            splits = [_hold_out(source, cfg.eval_holdout_ratio, cfg.seed) for source in sources]
            sources = [train for train, _ in splits]
            held_out = [held[i] for _, held in splits for i in range(len(held))]
            self.log(f"held out {len(held_out)} training samples for evaluation (eval_holdout_ratio)")
        probs = [float(p) for p in cfg.dataset_probs.split(",")] if cfg.dataset_probs else None
        self.epoch_order = EpochOrder([len(s) for s in sources], probs, cfg.seed, batch_size=cfg.train_batch_size)
        if len(sources) > 1:
            self.log(f"mixing, per epoch of {self.epoch_order.length} samples:\n" +
                     "\n".join("  " + line for line in self.epoch_order.describe(cfg.dataset.split(","))))
        return (sources[0] if len(sources) == 1 else Concatenated(sources)), held_out

    def collate(self, samples: list[Sample]) -> MicroBatch:
        if self.cfg.packing_samples:
            return collate_packed(samples, self.cfg.max_len, self.pad_id)
        return collate(samples, self.pad_id)

    def _step_samples(self, step: int) -> list[list[Sample]]:
        """This rank's micro-batches of samples for a global step."""
        epoch, step_in_epoch = divmod(step, self.sampler.steps_per_epoch)
        return [[self.train_samples[i] for i in idx] for idx in self.sampler.indices(epoch, step_in_epoch)]

    def _report_padding(self, max_steps: int = 200) -> None:
        """The share of computed token slots that are real tokens, over this rank's first steps (at most 200)."""
        steps = range(min(self.sampler.steps_per_epoch, self.total_steps, max_steps))
        groups = [group for step in steps for group in self._step_samples(step)]
        unpacked = padding_efficiency([collate(g, self.pad_id) for g in groups])
        if not self.cfg.packing_samples:
            self.log(f"padding: {unpacked:.1%} of computed token slots are real tokens")
            return
        packed = [collate_packed(g, self.cfg.max_len, self.pad_id) for g in groups]
        rows = sum(b.input_ids.shape[0] for b in packed)
        self.log(f"packing: {sum(map(len, groups)) / rows:.2f} samples per row; {padding_efficiency(packed):.1%} "
                 f"of computed token slots are real tokens (without packing: {unpacked:.1%})")

    def _load_models(self) -> None:
        cfg, env = self.cfg, self.env
        compute_dtype = resolve_dtype(cfg, env.device)
        self.export_config = AutoConfig.from_pretrained(cfg.pretrain, trust_remote_code=cfg.trust_remote_code)
        # fp32 master weights for the student; the frozen teacher only ever computes, in the compute dtype
        self.student: ShardedCausalLM = load_sharded(cfg.pretrain, cfg, env, torch.float32, shard_student, "student",
                                                     self.vocab_size)
        self.teacher: ShardedCausalLM | None = self.teacher_setup.load_model(env, compute_dtype)
        CLOCK.lap("models")
        for role, root in (("student", self.student), ("teacher", self.teacher)):
            if root is not None:
                with root.gathered_head():
                    root(verify_head, role, self.vocab_size, env.device)
                root.reshard_everything()
        CLOCK.lap("head probes")
        self.teacher_source = self.teacher_setup.open(env.device)
        self.spec = LossSpec(kd_coef=cfg.kd_coef if self.teacher_source else 0.0, divergence=cfg.kd_loss,
                             jsd_beta=cfg.jsd_beta, temperature=cfg.kd_temperature,
                             vocab_chunk=cfg.kd_vocab_chunk, token_chunk=cfg.kd_token_chunk,
                             chunk_budget_mb=cfg.kd_chunk_budget_mb, compile=cfg.compile_loss)
        self.on_policy, self.on_policy_spec = None, self.spec
        if cfg.on_policy_ratio > 0:
            settings = GenerationSettings(cfg.generate_max_new_tokens, cfg.generate_temperature, cfg.generate_top_p,
                                          stop_token_ids(self.tokenizer, _generation_config(cfg.pretrain)),
                                          cfg.max_len, self.pad_id, cfg.generate_gather_once, self.vocab_size)
            self.on_policy = OnPolicy(cfg.on_policy_ratio, cfg.seed, settings, env.rank, env.device)
            self.on_policy_spec = dataclasses.replace(self.spec, ce_coef=None if cfg.on_policy_ce else 0.0)
            self.log(f"on-policy: {cfg.on_policy_ratio:.0%} of micro-batches train on the student's own responses "
                     f"(up to {cfg.generate_max_new_tokens} tokens, temperature {cfg.generate_temperature:g}, top-p "
                     f"{cfg.generate_top_p:g}, stop ids {list(settings.stop_ids)}; student "
                     f"{'gathered once per generate' if cfg.generate_gather_once else 're-gathered per token'}; CE "
                     f"{'on' if cfg.on_policy_ce else 'off'} there)")
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.learning_rate,
                                           betas=cfg.adam_betas, weight_decay=cfg.l2)
        self.start_step = 0
        if cfg.load_checkpoint:
            if self.resume_from:
                self.start_step = ckpt.load_checkpoint(self.student, self.optimizer, self.resume_from, env.rank)
                self.log(f"resumed from {self.resume_from} at step {self.start_step}")
            else:
                self.log(f"load_checkpoint: no complete checkpoint in {cfg.resolved_ckpt_path()} and no earlier "
                         "outputs in save_path; starting fresh")
        self.checkpoints = ckpt.CheckpointWriter(cfg, env.rank, cfg.async_save, self.training_data)
        self.metrics_log = MetricsLog(os.path.join(cfg.save_path, METRICS_FILE), env.is_main,
                                      self.start_step if cfg.load_checkpoint else None, cfg)
        self._print_summary(compute_dtype)

    def _print_summary(self, compute_dtype) -> None:
        cfg, env = self.cfg, self.env
        seq_tokens = float(self.train_samples.lengths.mean())
        lines = [
            f"world size {env.world_size} on {env.device.type} ({dist.get_backend() if dist.is_initialized() else 'single'})",
            f"student {parameter_count(self.student) / 1e6:.2f}M params: FSDP2 full shard, compute {compute_dtype}, "
            f"fp32 master weights and gradient reduction, activation checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
        ]
        lines += self.teacher_setup.describe()
        lines += [
            f"batch: {cfg.train_batch_size} sequences/step (~{cfg.train_batch_size * seq_tokens:.0f} tokens) = "
            f"{cfg.micro_train_batch_size} micro × {self.accumulation} accumulation × {env.world_size} ranks",
            f"steps: {self.total_steps} ({self.sampler.steps_per_epoch}/epoch); loss: "
            + (f"{1 - self.spec.kd_coef:g}·CE + {self.spec.kd_coef:g}·{cfg.kd_loss} (τ={cfg.kd_temperature:g})"
               if self.teacher_source else "CE (no teacher: plain SFT)"),
        ]
        self.log("\n".join("  " + line for line in lines))

    # ----------------------------------------------------------------------------------------------- steps
    def _run_micro_batch(self, batch: MicroBatch, spec: LossSpec):
        """(summed loss, summed metrics) of one micro-batch that is already on the device."""
        targets = self.teacher_source.targets(batch) if self.teacher_source else None
        return self.student(student_loss, batch, spec, self.vocab_size, targets)

    def _device_batches(self, groups: list[list[Sample]]) -> list[MicroBatch]:
        """Every micro-batch of a step collated on the host and queued for the device at once: on CUDA the copies
        are asynchronous, so the next micro-batch's inputs are there before it starts."""
        return [self.collate(samples).to(self.env.device) for samples in groups]

    def _reduce(self, sums: torch.Tensor, extra: list[torch.Tensor] = ()) -> tuple[dict[str, float], list[float]]:
        """Global per-token means of the summed metrics (`sums`, ordered as _SUMMED, on the device), and the values
        of `extra` (already global; each flattened) — all in one device-to-host transfer, the step's only one."""
        host = torch.cat([all_reduce_sum(sums.clone()), *(e.reshape(-1).double() for e in extra)]).tolist()
        totals = dict(zip(_SUMMED, host[:len(_SUMMED)]))
        tokens = max(totals["tokens"], 1.0)
        names = METRIC_NAMES if self.teacher_source is not None else ("ce",)  # no teacher: nothing to compare
        out = {k: totals[k] / tokens for k in ("loss", *names)}
        out["tokens"] = totals["tokens"]
        # a cache's metrics say what they are: over buckets, or estimates from draws (None: not available)
        renamed = getattr(self.teacher_source, "metric_names", {})
        out = {renamed.get(k, k): v for k, v in out.items() if renamed.get(k, k) is not None}
        return out, host[len(_SUMMED):]

    def _summed(self, loss_sum: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([loss_sum.detach().double(), *(metrics[k] for k in _SUMMED[1:])])

    def forward_backward(self, step: int) -> StepWork:
        """Accumulates this rank's share of the step's gradients; returns the summed metrics (on the device, ordered
        as _SUMMED), those of its on-policy micro-batches alone, its batches and what generation did.

        Each micro-batch's summed loss is divided by the step's *global* count of trainable tokens (all ranks, all
        micro-batches), and FSDP sums gradients across ranks, so the gradient is the mean over the global batch
        whatever the split into micro-batches and ranks. Nothing here waits for the device: the token count stays a
        device tensor, and so do the metrics. With HSDP, gradients are all-reduced across replicas only after the
        last micro-batch; the ones before only reduce-scatter within the shard group. On-policy micro-batches get
        the student's own responses first (`on_policy`), so the count includes them."""
        groups = self._step_samples(step)
        on_policy, generation = [False] * len(groups), GenerationStats()
        if self.on_policy is not None:
            groups, on_policy, generation = self.on_policy.rewrite(self.student, step, groups)
        micro_batches = self._device_batches(groups)
        local_tokens = _host_values([sum(mb.trainable_tokens for mb in micro_batches)], self.env.device)[0]
        global_tokens = all_reduce_sum(local_tokens).clamp_min(1.0)
        self.student.train()
        hybrid = self.cfg.sharding_strategy == "hybrid_shard"
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64, device=self.env.device)
        on_policy_sums = torch.zeros_like(sums)
        for i, (batch, generated) in enumerate(zip(micro_batches, on_policy)):
            if hybrid:
                self.student.set_requires_all_reduce(i == len(micro_batches) - 1)
            loss_sum, metrics = self._run_micro_batch(batch, self.on_policy_spec if generated else self.spec)
            (loss_sum / global_tokens).backward()
            summed = self._summed(loss_sum, metrics)
            sums += summed
            if generated:
                on_policy_sums += summed
        return StepWork(sums, on_policy_sums, micro_batches, generation)

    def train_step(self, step: int) -> StepResult:
        lr = lr_at(step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        work = self.forward_backward(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        device, gen = self.env.device, work.generation
        counts = _host_values([sum(mb.real_tokens for mb in work.micro_batches), gen.micro_batches,
                               len(work.micro_batches), gen.sequences, gen.tokens, gen.seconds], device)
        summed = all_reduce_sum(torch.cat([work.on_policy_sums[_SUMMED.index("kl")].reshape(1),
                                           work.on_policy_sums[_SUMMED.index("tokens")].reshape(1), counts]))
        metrics, (norm, peak, kl_on, tokens_on, real_tokens, *on) = self._reduce(
            work.sums, [grad_norm, peak_memory(device), summed])
        metrics.update(lr=lr, grad_norm=norm, peak_mem_gb=peak)
        if self.on_policy is not None:
            metrics.update(_on_policy_metrics(metrics, kl_on, tokens_on, *on, world_size=self.env.world_size))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(norm)  # global values: every rank agrees
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(metrics, int(real_tokens), skipped=not finite)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.student.eval()
        sums = torch.zeros(len(_SUMMED), dtype=torch.float64, device=self.env.device)
        groups = eval_shards(self.eval_samples, self.cfg.micro_train_batch_size, self.env.rank, self.env.world_size)
        for batch in self._device_batches(groups):
            loss_sum, metrics = self._run_micro_batch(batch, self.spec)
            sums += self._summed(loss_sum, metrics)
        self.student.reshard_everything()
        reduced, _ = self._reduce(sums)
        return {"eval_" + ("ce_loss" if k == "ce" else k): v for k, v in reduced.items()}

    # ------------------------------------------------------------------------------------------------ loop
    def train(self, on_step: Callable[[int, int], None] | None = None) -> dict:
        """Runs the remaining steps, then exports; `on_step(done, total)` after each step (the demo's progress)."""
        cfg = self.cfg
        started, seen_tokens, window_tokens, window_start = time.time(), 0, 0, time.time()
        best_eval, last_eval = None, None
        guard = SkipGuard(cfg.max_skipped_steps, cfg.resolved_ckpt_path())
        for step in range(self.start_step, self.total_steps):
            result = self.train_step(step)
            done = step + 1
            startup = CLOCK.finish("first step") if step == self.start_step else None
            if startup:
                self.log(startup)
            self.checkpoints.poll()
            if result.skipped:
                self.log(f"step {done}: skipped, no update (loss {result.metrics['loss']}, grad norm "
                         f"{result.metrics['grad_norm']}); {guard.in_a_row + 1} in a row, limit {cfg.max_skipped_steps}")
                self.metrics_log.write({"step": done, "skipped": True, **result.metrics})
            guard.update(done, result.skipped)
            if on_step is not None:
                on_step(done, self.total_steps)
            seen_tokens += result.real_tokens
            window_tokens += result.real_tokens
            if not result.skipped and (done % cfg.logging_steps == 0 or done == self.total_steps):
                elapsed = time.time() - window_start
                record = {"step": done, **{k: round(v, 6) for k, v in result.metrics.items()},
                          "tokens_per_sec": round(window_tokens / max(elapsed, 1e-9), 1),
                          "peak_mem_gb": round(result.metrics["peak_mem_gb"], 3)}
                self.metrics_log.write(record)
                eta = (time.time() - started) / (done - self.start_step) * (self.total_steps - done)
                teacher_part = "".join(f"{name} {record[key]:.4f} | " for key, name in _shown_teacher_metrics(record))
                if "on_policy_share" in record:
                    teacher_part += (f"on-policy {record['on_policy_share']:.0%}, {record['generated_len']:.1f} "
                                     f"tokens, {record['gen_tokens_per_sec']:.0f} gen tok/s | ")
                self.log(f"step {done}/{self.total_steps} | loss {record['loss']:.4f} | ce {record['ce']:.4f} | "
                         f"{teacher_part}lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
                         f"{record['tokens_per_sec']:.0f} tok/s | mem {record['peak_mem_gb']:.2f} GB | eta {eta:.0f}s")
                window_tokens, window_start = 0, time.time()
            if self.eval_samples and cfg.eval_steps > 0 and (done % cfg.eval_steps == 0 or done == self.total_steps):
                last_eval = self.evaluate()
                self.metrics_log.write({"step": done, **{k: round(v, 6) for k, v in last_eval.items()}})
                self.log(f"eval @ {done}: ce {last_eval['eval_ce_loss']:.4f}" + "".join(
                    f" | {name} {last_eval[key]:.4f}" for key, name in _shown_teacher_metrics(last_eval, "eval_")[:1]))
                if best_eval is None or last_eval["eval_loss"] < best_eval["eval_loss"]:
                    best_eval = last_eval
            if cfg.save_steps > 0 and done % cfg.save_steps == 0:
                path = self.checkpoints.save(self.student, self.optimizer, done)
                self.log(f"{'saving' if cfg.async_save else 'saved'} checkpoint {path}")
        save_error = None
        try:
            self.checkpoints.finish()
        except ckpt.CheckpointError as e:  # the trained model is still in memory: export it, then report
            save_error = e
        self.export()
        if save_error is not None:
            raise save_error
        summary = {"steps": self.total_steps, "seconds": round(time.time() - started, 1), "tokens": seen_tokens,
                   "final_eval": last_eval, "best_eval": best_eval, "model": self.cfg.save_path}
        evals = ""
        if last_eval:
            evals = f"; eval CE final {last_eval['eval_ce_loss']:.4f} (best {best_eval['eval_ce_loss']:.4f})"
            for key, name in _shown_teacher_metrics(last_eval, "eval_")[:1]:
                evals += f", eval {name} final {last_eval[key]:.4f} (best {best_eval[key]:.4f})"
        self.log(f"done: {summary['steps']} steps in {summary['seconds']}s, {seen_tokens} tokens{evals}; "
                 f"HF model in {self.cfg.save_path}")
        return summary

    def export(self) -> None:
        export_student(self.student, self.export_config, self.tokenizer, self.cfg.save_path, self.env.rank,
                       source=self.cfg.pretrain, trust_remote_code=self.cfg.trust_remote_code)

    def close(self, failed: bool) -> None:
        """Ends the metric mirrors (W&B, TensorBoard) as finished or failed."""
        self.metrics_log.close(failed)


def peak_memory(device: torch.device) -> torch.Tensor:
    """The largest peak memory over the ranks, in GB, as a [1] tensor on the device: CUDA allocator peak on GPU, max
    RSS of the process on CPU. Nothing waits for it; `train_step` reads it with the step's other metrics."""
    if device.type == "cuda":
        local = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = _host_values([local / 1024**3], device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak


def peak_memory_gb(device: torch.device) -> float:
    """`peak_memory` read on the host at once: a sync, for the benches, between steps."""
    return peak_memory(device).item()


def _host_values(values: list[float], device: torch.device) -> torch.Tensor:
    """Numbers the host knows, as a float64 tensor on the device, copied without stalling it (`data.to_device`)."""
    return to_device(torch.tensor(values, dtype=torch.float64), device)


def _generation_config(path: str):
    """The student's generation_config.json (its EOS ids), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _shown_teacher_metrics(record: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(key, label) of the teacher metrics a log line shows: the KL and the teacher's entropy, under whichever name
    the teacher source gives them (a cache's are over buckets, or estimates)."""
    shown = []
    for base, label in (("kl", "kl"), ("teacher_entropy", "H(teacher)")):
        for suffix, note in (("", ""), ("_buckets", " (buckets)"), ("_estimate", " (estimate)")):
            if prefix + base + suffix in record:
                shown.append((prefix + base + suffix, label + note))
    return shown


def _holds_a_run(save_path: str) -> bool:
    if not os.path.isdir(save_path):
        return False
    names = os.listdir(save_path)
    return METRICS_FILE in names or "config.json" in names or any(n.endswith(".safetensors") for n in names)
