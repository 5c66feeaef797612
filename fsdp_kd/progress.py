"""What the training loop says as it goes, and when: a skipped step at once (counted by `run_log.SkipGuard`, which
stops a diverged run), every `logging_steps` the step's line and record with the throughput since the last, each
evaluation's line and record, and the run's summary at the end. `run_log` says how each is written."""

from __future__ import annotations

import time

from .run_log import MetricsLog, SkipGuard, done_line, eval_line, step_line


class Progress:
    def __init__(self, metrics_log: MetricsLog, log, guard: SkipGuard, start_step: int, total_steps: int,
                 logging_steps: int):
        self.metrics_log, self.log, self.guard = metrics_log, log, guard
        self.start_step, self.total_steps, self.logging_steps = start_step, total_steps, logging_steps
        self.started, self.seen_tokens, self.window_tokens, self.window_start = time.time(), 0, 0, time.time()
        self.best_eval = self.last_eval = None

    def stepped(self, done: int, result) -> None:
        """A step that was skipped (its loss or gradient norm not finite) is said and recorded at once."""
        if result.skipped:
            self.log(f"step {done}: skipped, no update (loss {result.metrics['loss']}, grad norm "
                     f"{result.metrics['grad_norm']}); {self.guard.in_a_row + 1} in a row, limit {self.guard.limit}")
            self.metrics_log.write({"step": done, "skipped": True, **result.metrics})
        self.guard.update(done, result.skipped)

    def logged(self, done: int, result) -> None:
        """The step's tokens counted; every `logging_steps` (and at the last step) its line and record."""
        self.seen_tokens += result.real_tokens
        self.window_tokens += result.real_tokens
        if not result.skipped and (done % self.logging_steps == 0 or done == self.total_steps):
            elapsed = time.time() - self.window_start
            record = {"step": done, **{k: round(v, 6) for k, v in result.metrics.items()},
                      "tokens_per_sec": round(self.window_tokens / max(elapsed, 1e-9), 1),
                      "peak_mem_gb": round(result.metrics["peak_mem_gb"], 3)}
            self.metrics_log.write(record)
            eta = (time.time() - self.started) / (done - self.start_step) * (self.total_steps - done)
            self.log(step_line(record, self.total_steps, eta))
            self.window_tokens, self.window_start = 0, time.time()

    def evaluated(self, done: int, metrics: dict[str, float]) -> None:
        self.last_eval = metrics
        self.metrics_log.write({"step": done, **{k: round(v, 6) for k, v in metrics.items()}})
        self.log(eval_line(done, metrics))
        if self.best_eval is None or metrics["eval_loss"] < self.best_eval["eval_loss"]:
            self.best_eval = metrics

    def summary(self, model: str) -> dict:
        """The run's summary, said as its last line."""
        summary = {"steps": self.total_steps, "seconds": round(time.time() - self.started, 1),
                   "tokens": self.seen_tokens, "final_eval": self.last_eval, "best_eval": self.best_eval,
                   "model": model}
        self.log(done_line(summary))
        return summary
