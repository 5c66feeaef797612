"""The training loop: one optimizer step = accumulate micro-batches, clip, step, log; that is all.

Everything before the first step (the cheap checks, then the models) is `run_setup`; what the loop says as it goes,
`progress`; how a step's metrics reach the host, `step_metrics`; where the teacher's targets come from, `teacher`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .cross_tokenizer import LEFT_OUT
from .data import MicroBatch, host_values
from .distill import run_student
from .distributed import DistEnv, all_reduce_sum
from .export import export_student
from .loss import LossSpec
from .on_policy import GenerationStats, on_policy_metrics
from .preemption import MidStepCheck, Preempted, StopSignals
from .progress import Progress
from .records import Sample
from .run_log import SkipGuard, peak_memory
from .run_setup import load_models, preflight
from .schedule import LRSchedule
from .startup import CLOCK
from .step_metrics import SUMMED, no_sums, reduce_sums, summed


@dataclass
class StepResult:
    metrics: dict[str, float]
    real_tokens: int
    skipped: bool = False  # the loss or the gradient norm was not finite: no optimizer update
    stop: bool = False  # a rank got a stop signal: the run saves this step and ends (`preemption`)


@dataclass
class StepWork:
    """What a step's forward and backward passes leave for the optimizer step and the log."""
    sums: torch.Tensor  # summed metrics, ordered as step_metrics.SUMMED, on the device
    on_policy_sums: torch.Tensor  # those of the on-policy micro-batches alone
    micro_batches: list[MicroBatch]
    generation: GenerationStats


class Trainer:
    """One run on this rank: set up by `run_setup` (the checks, the data and the teacher, then the models), then
    `train` takes the steps from `start_step` to `total_steps`, evaluating, checkpointing and logging as the config
    asks, and exports the student. A stop signal that `stop` hears ends it early, saved (`preemption`)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, log=print, stop: StopSignals | None = None):
        self.cfg, self.env = cfg, env
        self.stop = stop or StopSignals(cfg.preempt_signal, cfg.preempt_grace_s)
        self.mid_step: MidStepCheck | None = None  # once a step and a save outlast the grace period
        self.step_seconds = self.save_seconds = 0.0  # this rank's last of each, measured on the host
        self.log = log if env.is_main else (lambda *a, **k: None)
        ready = preflight(cfg, env, self.log)
        self.tokenizer, self.teacher, self.data = ready.tokenizer, ready.teacher, ready.data
        self.vocab_size, self.total_steps = ready.teacher.vocab_size, ready.total_steps
        models = load_models(cfg, env, ready, self.log)
        self.student, self.optimizer, self.start_step = models.student, models.optimizer, models.start_step
        self.spec, self.on_policy, self.on_policy_spec = models.spec, models.on_policy, models.on_policy_spec
        self.checkpoints, self.metrics_log = models.checkpoints, models.metrics_log
        self.export_config, self.schedule = models.export_config, LRSchedule.of(cfg)
        CLOCK.lap("optimizer and logs")

    # ----------------------------------------------------------------------------------------------- steps
    def _run_micro_batch(self, batch: MicroBatch, spec: LossSpec):
        """(summed loss, summed metrics) of one micro-batch that is already on the device."""
        return run_student(self.student, batch, spec, self.vocab_size, self.teacher.targets(batch))

    def _device_batches(self, groups: list[list[Sample]]) -> list[MicroBatch]:
        """Every micro-batch of a step collated on the host and queued for the device at once: on CUDA the copies
        are asynchronous, so the next micro-batch's inputs are there before it starts. The teacher hears of them all
        at once too (a teacher on ranks of its own starts on them)."""
        batches = [self.data.collate(samples).to(self.env.device) for samples in groups]
        self.teacher.begin(batches)
        return batches

    def _reduce(self, sums: torch.Tensor, extra: list[torch.Tensor] = ()) -> tuple[dict[str, float], list[float]]:
        """The step's metrics as the teacher names them, and `extra`, on the host (`step_metrics.reduce_sums`)."""
        return reduce_sums(sums, self.teacher.metric_names, extra, self.teacher.metric_groups)

    def forward_backward(self, step: int) -> StepWork:
        """Accumulates this rank's share of the step's gradients; returns the summed metrics (on the device, ordered
        as SUMMED), those of its on-policy micro-batches alone, its batches and what generation did.

        Each micro-batch's summed loss is divided by the step's *global* count of trainable tokens (all ranks, all
        micro-batches), and FSDP sums gradients across ranks, so the gradient is the mean over the global batch
        whatever the split into micro-batches and ranks. Nothing here waits for the device: the token count stays a
        device tensor, and so do the metrics. With HSDP, gradients are all-reduced across replicas only after the
        last micro-batch; the ones before only reduce-scatter within the shard group. On-policy micro-batches get
        the student's own responses first (`on_policy`), so the count includes them."""
        groups = self.data.step_samples(step)
        on_policy, generation = [False] * len(groups), GenerationStats()
        if self.on_policy is not None:
            groups, on_policy, generation = self.on_policy.rewrite(self.student, step, groups)
        micro_batches = self._device_batches(groups)
        local_tokens = host_values([sum(mb.trainable_tokens for mb in micro_batches)], self.env.device)[0]
        global_tokens = all_reduce_sum(local_tokens).clamp_min(1.0)
        self.student.train()
        sums = no_sums(self.env.device, len(self.teacher.metric_groups))
        on_policy_sums = torch.zeros_like(sums)
        for i, (batch, generated) in enumerate(zip(micro_batches, on_policy)):
            left = (len(micro_batches) - i) / len(micro_batches) * self.step_seconds + self.save_seconds
            if self.mid_step is not None and self.mid_step.must_stop(self.stop, left):
                raise self._dropped(step, i, len(micro_batches))
            if self.student.replicated:
                self.student.set_requires_all_reduce(i == len(micro_batches) - 1)
            loss_sum, metrics = self._run_micro_batch(batch, self.on_policy_spec if generated else self.spec)
            (loss_sum / global_tokens).backward()
            sums_here = summed(loss_sum, metrics)
            sums += sums_here
            if generated:
                on_policy_sums += sums_here
        return StepWork(sums, on_policy_sums, micro_batches, generation)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step. Its reduced counts also carry each rank's stop flag and its last step and save times,
        so the ranks agree on a stop, and on whether to check for one between micro-batches, at no extra cost."""
        started = time.monotonic()
        lr = self.schedule.at(step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        work = self.forward_backward(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        device, gen = self.env.device, work.generation
        left_out = [sum(counts) for counts in zip(*(mb.left_out for mb in work.micro_batches))]
        counts = host_values([sum(mb.real_tokens for mb in work.micro_batches), gen.micro_batches,
                               len(work.micro_batches), gen.sequences, gen.tokens, gen.seconds, gen.stopped,
                               self.stop.flag,
                               self.step_seconds + self.save_seconds, *left_out], device)
        totals = all_reduce_sum(torch.cat([work.on_policy_sums[SUMMED.index("kl")].reshape(1),
                                           work.on_policy_sums[SUMMED.index("kd_tokens")].reshape(1), counts,
                                           self.teacher.signalled(device)]))
        metrics, (norm, peak, kl_on, kd_tokens_on, real_tokens, *rest) = self._reduce(
            work.sums, [grad_norm, peak_memory(device), totals])
        on, (stops, seconds), left_out, teacher_stops = rest[:6], rest[6:8], rest[8:-1], rest[-1]
        metrics.update(lr=lr, grad_norm=norm, peak_mem_gb=peak)
        if self.teacher.retokenize is not None:  # across tokenizers: the trained tokens without a KD term, by why
            metrics.update({f"kd_left_out_{why}": n for why, n in zip(LEFT_OUT.values(), left_out)})
        if self.on_policy is not None:
            metrics.update(on_policy_metrics(metrics, kl_on, kd_tokens_on, *on, world_size=self.env.world_size))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(norm)  # global values: every rank agrees
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mid_step is None and seconds / self.env.world_size > self.stop.grace_s:  # agreed: reduced values
            self.mid_step = MidStepCheck(self.cfg.dist_timeout_minutes)
        self.step_seconds = time.monotonic() - started
        return StepResult(metrics, int(real_tokens), skipped=not finite, stop=stops + teacher_stops > 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.student.eval()
        sums = no_sums(self.env.device, len(self.teacher.metric_groups))
        groups = self.data.eval_groups(self.cfg.micro_train_batch_size, self.env.rank, self.env.world_size)
        ahead = self.data.sampler.accumulation  # begun at once, as a step's: not the whole eval set on the device
        for start in range(0, len(groups), ahead):  # (nor sent to the teacher ranks) at once
            for batch in self._device_batches(groups[start:start + ahead]):
                loss_sum, metrics = self._run_micro_batch(batch, self.spec)
                sums += summed(loss_sum, metrics)
        self.student.reshard_everything()
        reduced, _ = self._reduce(sums)
        return {"eval_" + ("ce_loss" if k == "ce" else k): v for k, v in reduced.items()}

    # ------------------------------------------------------------------------------------------------ loop
    def train(self, on_step: Callable[[int, int], None] | None = None) -> dict:
        """Runs the remaining steps, then exports; `on_step(done, total)` after each step (the demo's progress)."""
        cfg = self.cfg
        progress = Progress(self.metrics_log, self.log, SkipGuard(cfg.max_skipped_steps, cfg.resolved_ckpt_path()),
                            self.start_step, self.total_steps, cfg.logging_steps)
        for step in range(self.start_step, self.total_steps):
            result = self.train_step(step)
            done = step + 1
            startup = CLOCK.finish("first step") if step == self.start_step else None
            if startup:
                self.log(startup)
            self.checkpoints.poll()
            progress.stepped(done, result)
            if on_step is not None:
                on_step(done, self.total_steps)
            progress.logged(done, result)
            stopping = result.stop and done < self.total_steps  # a stop on the last step: finish and export as usual
            if (self.data.held_out and cfg.eval_steps > 0 and not stopping  # no evaluation in the grace period
                    and (done % cfg.eval_steps == 0 or done == self.total_steps)):
                progress.evaluated(done, self.evaluate())
            saved = None
            if cfg.save_steps > 0 and done % cfg.save_steps == 0:
                saved = self._save(done)
                self.log(f"{'saving' if cfg.async_save else 'saved'} checkpoint {saved}")
            if stopping:
                raise self._preempted(done, saved)
        save_error = None
        try:
            self.checkpoints.finish()
        except ckpt.CheckpointError as e:  # the trained model is still in memory: export it, then report
            save_error = e
        self.export()
        if save_error is not None:
            raise save_error
        return progress.summary(cfg.save_path)

    def _save(self, done: int, synchronous: bool = False) -> str:
        started = time.monotonic()
        path = self.checkpoints.save(self.student, self.optimizer, done, synchronous)
        self.save_seconds = time.monotonic() - started
        return path

    def _preempted(self, done: int, saved: str | None) -> Preempted:
        """The stop at a step's end: that step's checkpoint on disk (written now, synchronously, unless save_steps
        has just begun it), then any save in flight finished, and one line that says so."""
        started = time.monotonic()
        path = saved or self._save(done, synchronous=True)
        self.checkpoints.finish()
        self.log(f"preempted at step {done}/{self.total_steps} ({self._signal()}): checkpoint {path} is complete "
                 f"({time.monotonic() - started:.1f}s to save); to resume, run the same command with "
                 f"--load_checkpoint true")
        return Preempted(f"preempted at step {done}")

    def _dropped(self, step: int, micro_batch: int, micro_batches: int) -> Preempted:
        """The stop within a step that would not end, and be saved, before the grace period does: the step is
        dropped, and the last complete checkpoint (an async save in flight finished first) is where to resume."""
        self.checkpoints.finish()
        self.log(f"preempted during step {step + 1}/{self.total_steps} ({self._signal()}): the rest of it and a save "
                 f"would take longer than what is left of preempt_grace_s {self.stop.grace_s:g}s, so it stopped before "
                 f"micro-batch {micro_batch + 1} of {micro_batches} and did not save it; the last complete checkpoint "
                 f"is {ckpt.latest_checkpoint(self.cfg.resolved_ckpt_path())}; to resume from it, run the same "
                 "command with --load_checkpoint true")
        return Preempted(f"preempted during step {step + 1}")

    def _signal(self) -> str:
        return f"{self.stop.received} here" if self.stop.received else "a stop signal on another rank"

    def export(self) -> None:
        export_student(self.student, self.export_config, self.tokenizer, self.cfg.save_path, self.env.rank,
                       source=self.cfg.pretrain, trust_remote_code=self.cfg.trust_remote_code)

    def close(self, failed: bool, preempted: bool = False) -> None:
        """Ends the metric mirrors (W&B, TensorBoard) as finished or failed, and, after a run that finished or was
        `preempted`, the teacher (a teacher on ranks of its own then stops; after a failure, torchrun stops it)."""
        self.metrics_log.close(failed)
        if not failed:
            self.teacher.close(preempted)
