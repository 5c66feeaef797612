"""What a run reports: metrics.jsonl and its mirrors, the log lines of steps and evaluations, the guard that stops a
diverged run, and the peak memory. The training loop (trainer.py) decides when; this module decides what is said.
"""

from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt
from .data import host_values
from .distributed import all_reduce_max
from .errors import ConfigError

METRICS_FILE = "metrics.jsonl"


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


def check_logger_packages(use_tensorboard: str | None, use_wandb: str | None) -> None:
    """Asked-for loggers must be importable; said before any heavy work."""
    import importlib.util

    for key, asked, module in (("use_tensorboard", use_tensorboard, "tensorboard"), ("use_wandb", use_wandb, "wandb")):
        if asked and importlib.util.find_spec(module) is None:
            raise ConfigError(f"key {key}: the {module} package is not installed; pip install {module} "
                              f"(or drop --{key})")


class MetricsLog:
    """metrics.jsonl on rank 0, mirrored to TensorBoard and W&B when asked. On resume, lines past the resumed step
    are dropped so the file reads as one run. `use_tensorboard` is a log directory, `use_wandb` a project (which
    records `run_config`, the config as a dict), as the keys of those names give them."""

    def __init__(self, path: str, enabled: bool, resume_step: int | None, use_tensorboard: str | None = None,
                 use_wandb: str | None = None, run_config: dict | None = None):
        self.path, self.enabled = path, enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(use_tensorboard)
        if use_wandb:
            import wandb

            self.wandb = wandb.init(project=use_wandb, config=run_config, resume="allow")

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


def shown_teacher_metrics(record: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(key, label) of the teacher metrics a log line shows: the KL and the teacher's entropy, under whichever name
    the teacher source gives them (a cache's are over buckets, or estimates)."""
    shown = []
    for base, label in (("kl", "kl"), ("teacher_entropy", "H(teacher)")):
        for suffix, note in (("", ""), ("_buckets", " (buckets)"), ("_estimate", " (estimate)"),
                             ("_shared_buckets", " (shared tokens)"),
                             ("_shared_buckets_lower_bound", " (shared tokens, top-k lower bound)"),
                             ("_aligned", " (aligned)"),
                             ("_buckets_aligned", " (buckets, aligned)")):
            if prefix + base + suffix in record:
                shown.append((prefix + base + suffix, label + note))
    return shown


def step_line(record: dict, total_steps: int, eta: float) -> str:
    """One logged step: loss, CE, the teacher metrics under the source's names, on-policy figures, lr, norm, speed."""
    teacher_part = "".join(f"{name} {record[key]:.4f} | " for key, name in shown_teacher_metrics(record))
    if "on_policy_share" in record:
        teacher_part += (f"on-policy {record['on_policy_share']:.0%}, {record['generated_len']:.1f} "
                         f"tokens, {record['generated_stop_share']:.0%} ended, "
                         f"{record['gen_tokens_per_sec']:.0f} gen tok/s | ")
    return (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | ce {record['ce']:.4f} | "
            f"{teacher_part}lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
            f"{record['tokens_per_sec']:.0f} tok/s | mem {record['peak_mem_gb']:.2f} GB | eta {eta:.0f}s")


def eval_line(step: int, metrics: dict) -> str:
    return f"eval @ {step}: ce {metrics['eval_ce_loss']:.4f}" + "".join(
        f" | {name} {metrics[key]:.4f}" for key, name in shown_teacher_metrics(metrics, "eval_")[:1])


def done_line(summary: dict) -> str:
    """The run's last line: steps, time, tokens, the final and best evaluation, where the model is."""
    last, best = summary["final_eval"], summary["best_eval"]
    evals = ""
    if last:
        evals = f"; eval CE final {last['eval_ce_loss']:.4f} (best {best['eval_ce_loss']:.4f})"
        for key, name in shown_teacher_metrics(last, "eval_")[:1]:
            evals += f", eval {name} final {last[key]:.4f} (best {best[key]:.4f})"
    return (f"done: {summary['steps']} steps in {summary['seconds']}s, {summary['tokens']} tokens{evals}; "
            f"HF model in {summary['model']}")


def peak_memory(device: torch.device) -> torch.Tensor:
    """The largest peak memory over the ranks, in GB, as a [1] tensor on the device: CUDA allocator peak on GPU, max
    RSS of the process on CPU. Nothing waits for it; `train_step` reads it with the step's other metrics."""
    if device.type == "cuda":
        local = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return all_reduce_max(host_values([local / 1024**3], device))


def peak_memory_gb(device: torch.device) -> float:
    """`peak_memory` read on the host at once: a sync, for the benches, between steps."""
    return peak_memory(device).item()
