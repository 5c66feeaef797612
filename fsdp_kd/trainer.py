"""The training loop: one optimizer step = accumulate micro-batches, clip, step, log; that is all.

Order of work at start is deliberate: everything that can reject the run cheaply (paths, output directory,
tokenizers, data, checkpoint compatibility: `preflight`) happens before either model is loaded. What the run reports
and how it says it is `run_log`; where the teacher's targets come from is `distill.TEACHER_SOURCES`.
"""

from __future__ import annotations

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
from .config import TrainConfig, config_to_yaml, gradient_accumulation_steps, loss_spec
from .data import MicroBatch, StepSampler, collate, collate_packed, eval_shards, host_values, padding_efficiency
from .records import Sample
from .distill import run_student, setup_teacher
from .distributed import DistEnv, all_reduce_sum, barrier
from .dtypes import resolve_dtype
from .export import export_student
from .loss import METRIC_NAMES, LossSpec
from .on_policy import GenerationSettings, GenerationStats, OnPolicy, on_policy_metrics, stop_token_ids
from .heads import verify_head
from .preflight import check_packing, check_paths, checkpoint_to_resume, data_spec, open_training_data, run_paths
from .run_log import (METRICS_FILE, MetricsLog, SkipGuard, check_logger_packages, done_line, eval_line, peak_memory,
                      step_line)
from .startup import CLOCK
from .models import (ShardedCausalLM, load_sharded, padding_id, parameter_count, shard_student,
                     tokenizer_or_error)

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
        check_paths(run_paths(cfg))
        check_packing(run_paths(cfg), cfg.packing_samples)
        self.accumulation = gradient_accumulation_steps(cfg, env.world_size)
        check_logger_packages(cfg.use_tensorboard, cfg.use_wandb)
        self.resume_from = checkpoint_to_resume(run_paths(cfg), cfg.load_checkpoint, cfg.to_dict())

        self.tokenizer = tokenizer_or_error(cfg.pretrain, "pretrain", cfg, cfg.tokenizer_chat_template)
        self.pad_id = padding_id(self.tokenizer)
        self.teacher_setup = setup_teacher(cfg, self.tokenizer)  # live, cache or none (distill.TEACHER_SOURCES)
        self.vocab_size = self.teacher_setup.vocab_size
        CLOCK.lap("tokenizers")

        data = open_training_data(data_spec(cfg), env, self.tokenizer, self.log, self.teacher_setup.retokenize)
        self.train_samples, self.eval_samples, self.sources = data.train, data.held_out, data.sources
        self.training_data, self.epoch_order = data.fingerprint, data.order
        if self.resume_from:
            ckpt.check_same_data(self.resume_from, self.training_data, self.log)
        self.sampler = StepSampler(self.epoch_order, cfg.micro_train_batch_size, env.rank, env.world_size,
                                   self.accumulation)
        self.total_steps = self.sampler.steps_per_epoch * cfg.max_epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._report_padding()
        CLOCK.lap("data")
        # last: with teacher_ranks, the teacher ranks start loading once every student rank has passed it
        self.teacher_setup.check(self.tokenizer, self.sources, self.env)

        barrier()  # every rank has checked save_path before rank 0 writes into it
        if env.is_main:
            os.makedirs(cfg.save_path, exist_ok=True)
            removed = ckpt.remove_partial_checkpoints(cfg.resolved_ckpt_path())
            if removed:
                self.log(f"removed incomplete checkpoints left by an interrupted save: {', '.join(removed)}")
            with open(os.path.join(cfg.save_path, CONFIG_FILE), "w") as f:  # never a run's: checked above
                f.write(config_to_yaml(cfg))
        if cfg.print_config:
            self.log("resolved config:\n" + config_to_yaml(cfg).rstrip())

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
        compute_dtype = resolve_dtype(cfg.param_dtype, env.device)
        self.export_config = AutoConfig.from_pretrained(cfg.pretrain, trust_remote_code=cfg.trust_remote_code)
        # fp32 master weights for the student; the frozen teacher only ever computes, in the compute dtype
        self.student: ShardedCausalLM = load_sharded(cfg.pretrain, cfg, env, torch.float32, shard_student, "student",
                                                     self.vocab_size)
        self.teacher: ShardedCausalLM | None = self.teacher_setup.load_model(env, compute_dtype)
        CLOCK.lap("models")
        for role, root, vocab in (("student", self.student, self.vocab_size),
                                  ("teacher", self.teacher, self.teacher_setup.teacher_vocab_size)):
            if root is not None:
                with root.gathered_head():
                    root(verify_head, role, vocab, env.device)
                root.reshard_everything()
        CLOCK.lap("head probes")
        self.teacher_source = self.teacher_setup.open(env.device)
        self.spec = loss_spec(cfg, **({} if self.teacher_source else {"kd_coef": 0.0}))
        self.on_policy, self.on_policy_spec = None, self.spec
        if cfg.on_policy_ratio > 0:
            settings = GenerationSettings(cfg.generate_max_new_tokens, cfg.generate_temperature, cfg.generate_top_p,
                                          stop_token_ids(self.tokenizer, _generation_config(cfg.pretrain)),
                                          cfg.max_len, self.pad_id, cfg.generate_gather_once, self.vocab_size)
            self.on_policy = OnPolicy(cfg.on_policy_ratio, cfg.seed, settings, env.rank, env.device,
                                      self.teacher_setup.retokenize)
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
        self.checkpoints = ckpt.CheckpointWriter(cfg.resolved_ckpt_path(), cfg.max_ckpt_num, cfg.to_dict(), env.rank,
                                                 cfg.async_save, self.training_data, cfg.dist_timeout_minutes)
        self.metrics_log = MetricsLog(os.path.join(cfg.save_path, METRICS_FILE), env.is_main,
                                      self.start_step if cfg.load_checkpoint else None, cfg.use_tensorboard,
                                      cfg.use_wandb, cfg.to_dict())
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
        return run_student(self.student, batch, spec, self.vocab_size, targets)

    def _device_batches(self, groups: list[list[Sample]]) -> list[MicroBatch]:
        """Every micro-batch of a step collated on the host and queued for the device at once: on CUDA the copies
        are asynchronous, so the next micro-batch's inputs are there before it starts. The teacher source hears of
        them all at once too (a teacher on ranks of its own starts on them)."""
        batches = [self.collate(samples).to(self.env.device) for samples in groups]
        if self.teacher_source is not None:
            self.teacher_source.begin(batches)
        return batches

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
        local_tokens = host_values([sum(mb.trainable_tokens for mb in micro_batches)], self.env.device)[0]
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
        counts = host_values([sum(mb.real_tokens for mb in work.micro_batches), gen.micro_batches,
                               len(work.micro_batches), gen.sequences, gen.tokens, gen.seconds], device)
        summed = all_reduce_sum(torch.cat([work.on_policy_sums[_SUMMED.index("kl")].reshape(1),
                                           work.on_policy_sums[_SUMMED.index("tokens")].reshape(1), counts]))
        metrics, (norm, peak, kl_on, tokens_on, real_tokens, *on) = self._reduce(
            work.sums, [grad_norm, peak_memory(device), summed])
        metrics.update(lr=lr, grad_norm=norm, peak_mem_gb=peak)
        if self.on_policy is not None:
            metrics.update(on_policy_metrics(metrics, kl_on, tokens_on, *on, world_size=self.env.world_size))
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
                self.log(step_line(record, self.total_steps, eta))
                window_tokens, window_start = 0, time.time()
            if self.eval_samples and cfg.eval_steps > 0 and (done % cfg.eval_steps == 0 or done == self.total_steps):
                last_eval = self.evaluate()
                self.metrics_log.write({"step": done, **{k: round(v, 6) for k, v in last_eval.items()}})
                self.log(eval_line(done, last_eval))
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
        self.log(done_line(summary))
        return summary

    def export(self) -> None:
        export_student(self.student, self.export_config, self.tokenizer, self.cfg.save_path, self.env.rank,
                       source=self.cfg.pretrain, trust_remote_code=self.cfg.trust_remote_code)

    def close(self, failed: bool) -> None:
        """Ends the metric mirrors (W&B, TensorBoard) as finished or failed, and, after a run that finished, the
        teacher source (a teacher on ranks of its own then stops; after a failure, torchrun stops it)."""
        self.metrics_log.close(failed)
        if not failed and self.teacher_source is not None:
            self.teacher_source.close()


def _generation_config(path: str):
    """The student's generation_config.json (its EOS ids), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None

