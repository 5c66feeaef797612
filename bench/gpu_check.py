"""The GPU check: five measurements on one GPU against published figures and the repo's own estimate, as one table.

    bash bench/gpu_check.sh [--out DIR]        # on a CUDA machine: about 5 minutes on one H200
    bash bench/gpu_check.sh --dry_run          # (or SMALL=1) every line of it on the CPU, shrunken shapes

Checks (each row of the table names its number):
  1  no host sync: one steady-state training step (the step bench's fsdp_kd step: batch to the device, teacher
     targets, the student's fused loss, backward, clipping, AdamW) under `torch.cuda.set_sync_debug_mode("error")`,
     after a warm-up step and the timed steps; any refusal fails the check. On the CPU the repo's sync detector
     (`fsdp_kd.testing.profiling.SyncDetector`) infers the syncs instead, when it is there.
  2  MFU of a Qwen2.5-0.5B-shaped student distilled from a Qwen2.5-1.5B-shaped teacher, bf16, 8192 tokens per
     micro-batch (2 × 4096), activation checkpointing on; model FLOPs over the measured bf16 matmul rate.
  3  the fused loss alone at Liger-Kernel's benchmark shape (bench/loss_bench.py --vs_liger), and Liger's
     `LigerFusedLinearJSDLoss` itself when it is installed.
  4  the training step at the shape of TRL's published GKD figure: Llama-3.2-1B-shaped student and teacher,
     32 sequences of 1024 tokens in one micro-batch, bf16, activation checkpointing on (TRL's default).
  5  the CUDA allocator's peak in the runs of checks 2 and 4 against bench/memory_estimate.py for the same shapes.

Status: ok (ran; for check 1, no sync), FAILED (crashed, or check 1 saw a sync), skipped (Liger not installed),
CPU dry run (ran on the CPU at the shrunken shapes: the figures only show that the code runs, and a sync the
detector reports is listed, not failed). The exit status is 1 when any row FAILED; the table is printed either
way, with each crash's error above it. `datasets` is not needed (the GPU machine has none): the dry run hides it.
Memory is in GB of 10⁹ bytes throughout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import loss_bench, step_bench  # noqa: E402
from bench.launch import run_worker  # noqa: E402
from bench.loss_bench import KernelShape  # noqa: E402
from bench.memory_estimate import Shape, memory_per_gpu  # noqa: E402

GB = 1e9
# Published figures (one H100 each) and the repo's own goal
LIGER_MS, LIGER_GB = 60.7, 11.0  # Liger-Kernel's distill JSD benchmark, forward + backward at LIGER_SHAPE
TRL_SECONDS, TRL_TOKENS = 1.224, 32 * 1024  # TRL's GKDTrainer step at the TRL case's shape
MFU_GOAL = 0.70  # issue 6: of the measured matmul rate (docs/benchmarks.md)


@dataclass
class StepCase:
    """One step-bench run (checks 1, 5 and 2 or 4 read it): the models' shapes and the batch."""
    name: str
    arch: str
    student: Shape
    teacher: Shape
    seq: int
    batch: int
    steps: int
    dtype: str = "bf16"

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def flags(self) -> list[str]:
        out = [f"--arch={self.arch}", f"--seq={self.seq}", f"--batch={self.batch}", f"--steps={self.steps}",
               f"--vocab={self.student.vocab}", f"--param_dtype={self.dtype}", "--gradient_checkpointing",
               "--sync_check"]
        for role, shape in (("student", self.student), ("teacher", self.teacher)):
            out += [f"--{role}_hidden={shape.hidden}", f"--{role}_layers={shape.layers}",
                    f"--{role}_heads={shape.heads}", f"--{role}_kv_heads={shape.kv_heads}",
                    f"--{role}_intermediate={shape.mlp}"]
        return out + (["--tied"] if self.student.tied else [])


QWEN_05B = Shape("Qwen2.5-0.5B", 896, 24, 4864, 14, 2, 151936, tied=True)
QWEN_15B = Shape("Qwen2.5-1.5B", 1536, 28, 8960, 12, 2, 151936, tied=True)
LLAMA_1B = Shape("Llama-3.2-1B", 2048, 16, 8192, 32, 8, 128256, tied=True)
FULL = {
    "qwen": StepCase("0.5B ← 1.5B, 2 × 4096 tokens", "qwen2", QWEN_05B, QWEN_15B, seq=4096, batch=2, steps=3),
    "trl": StepCase("1B ← 1B (TRL's), 32 × 1024 tokens", "llama", LLAMA_1B, LLAMA_1B, seq=1024, batch=32, steps=3),
    "loss": loss_bench.LIGER_SHAPE,
}
# The dry run: the same cases at sizes a 2-core CPU runs in seconds (heads, KV heads, tying and arch kept), the
# steps in fp32 (a CPU multiplies bf16 matrices some 25 times slower), the loss kernel in bf16 as on the GPU
SMALL_STUDENT, SMALL_TEACHER = Shape("s", 64, 2, 128, 4, 2, 512, True), Shape("t", 96, 2, 192, 4, 2, 512, True)
SMALL_LLAMA = Shape("l", 64, 2, 256, 4, 2, 1024, True)
SMALL = {
    "qwen": StepCase("dry-run qwen2 shapes, 2 × 64 tokens", "qwen2", SMALL_STUDENT, SMALL_TEACHER, seq=64, batch=2,
                     steps=1, dtype="fp32"),
    "trl": StepCase("dry-run llama shapes, 4 × 32 tokens", "llama", SMALL_LLAMA, SMALL_LLAMA, seq=32, batch=4,
                    steps=1, dtype="fp32"),
    "loss": KernelShape(tokens=256, student_hidden=64, teacher_hidden=128, vocab=2048, repeats=2),
}


@dataclass
class Row:
    check: int
    name: str
    measured: str
    reference: str
    ratio: str
    status: str


class Crash(Exception):
    """A check's run failed; `summary` is the line the table shows (the worker's exception, not torchrun's report
    about it), the message is everything it printed."""

    def __init__(self, text: str):
        super().__init__(text)
        lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in text.splitlines() if line.strip()]
        raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line) and
                  "ChildFailedError" not in line]
        self.summary = "crashed: " + (raised or lines or ["no output"])[-1][:160]


def ratio(measured: float, reference: float) -> str:
    return f"{measured / reference:.2f}×"


def step_rows(case: StepCase, result: dict, status: str, mfu: bool, trl: bool) -> list[Row]:
    """Checks 1, 5 and either 2 (mfu) or 4 (trl) from one step-bench result."""
    rows = []
    syncs = result["syncs"]
    sync_status = status if status != "ok" or syncs == "none" else "FAILED"
    rows.append(Row(1, f"no host sync in the step: {case.name}", f"syncs: {syncs}",
                    'set_sync_debug_mode("error") raises nothing', "—", sync_status))
    if mfu:
        rows.append(Row(2, f"MFU, {case.dtype}, checkpointing: {case.name}",
                        f"{result['mfu']:.0%} ({result['model_tflops']:.3g} TFLOP/s of model FLOPs; matmul "
                        f"{result['matmul_gflops'] / 1000:.3g} TFLOP/s; {result['tokens_per_sec']:.0f} tok/s)",
                        f"goal {MFU_GOAL:.0%} (issue 6)", ratio(result["mfu"], MFU_GOAL), status))
    if trl:
        rows.append(Row(4, f"step time at TRL's shape: {case.name}",
                        f"{result['seconds_per_step']:.3f} s/step, {result['tokens_per_sec']:.0f} tok/s",
                        f"{TRL_SECONDS} s/step, {TRL_TOKENS / TRL_SECONDS:.0f} tok/s (TRL GKDTrainer, H100)",
                        ratio(result["tokens_per_sec"], TRL_TOKENS / TRL_SECONDS) + " tok/s", status))
    estimate = sum(memory_per_gpu(case.teacher, case.student, shard=1, tokens=case.tokens, offload=False).values())
    peak = result["peak_gb"] * 1024**3  # the trainer's peak_memory_gb is in GiB
    rows.append(Row(5, f"peak memory vs estimate: {case.name}",
                    f"{peak / GB:.3g} GB ({'CUDA allocator' if result['device'].startswith('cuda') else 'max RSS'})",
                    f"{estimate / GB:.3g} GB (bench/memory_estimate.py)", ratio(peak, estimate), status))
    return rows


def run_step(case: StepCase, status: str, mfu: bool, trl: bool) -> list[Row]:
    try:
        result = run_worker(step_bench.__file__, 1, ["--impl", "fsdp_kd", *case.flags()])
    except SystemExit as e:  # run_worker exits with the workers' stderr: here it is one failed check of several
        raise Crash(str(e.code)) from None
    return step_rows(case, result, status, mfu, trl)


def run_loss(shape: KernelShape, status: str) -> list[Row]:
    what = (f"T {shape.tokens}, H {shape.student_hidden} ← {shape.teacher_hidden}, V {shape.vocab}, {shape.dtype}, "
            f"CE + JSD")
    try:
        ours = loss_bench.timed("fsdp_kd", shape)
    except RuntimeError as e:
        raise Crash(str(e)) from None
    peak = ours["peak_gb"] * loss_bench.GB / GB  # loss_bench reports GiB
    rows = [Row(3, f"fused loss fwd + bwd time: {what}", f"{ours['ms']:.1f} ms", f"{LIGER_MS} ms (Liger, H100)",
                ratio(ours["ms"], LIGER_MS), status),
            Row(3, f"fused loss peak memory: {what}", f"{peak:.3g} GB", f"≈{LIGER_GB:.0f} GB (Liger, H100)",
                ratio(peak, LIGER_GB), status)]
    return rows + [liger_row(shape, status)]


def liger_row(shape: KernelShape, status: str) -> Row:
    """Liger's own kernel at the same shape: measured when installed, else said so; a crash fails this row only."""
    name = "Liger's LigerFusedLinearJSDLoss, same shape"
    reference = f"{LIGER_MS} ms, ≈{LIGER_GB:.0f} GB (Liger, H100)"
    try:
        liger = loss_bench.timed("liger", shape)
    except RuntimeError as e:
        print(f"\n{e}\n", file=sys.stderr, flush=True)
        return Row(3, name, Crash(str(e)).summary, reference, "—", "FAILED")
    if "missing" in liger:
        return Row(3, name, liger["missing"], reference, "—", "skipped")
    return Row(3, name, f"{liger['ms']:.1f} ms, {liger['peak_gb'] * loss_bench.GB / GB:.3g} GB", reference,
               ratio(liger["ms"], LIGER_MS), status)


def crashed_rows(checks: list[tuple[int, str]], crash: Crash) -> list[Row]:
    return [Row(number, name, crash.summary, "—", "—", "FAILED") for number, name in checks]


def environment(dry_run: bool) -> str:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{device}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {transformers.__version__};"
            f" datasets {'importable' if importlib.util.find_spec('datasets') else 'not importable'}"
            + ("; DRY RUN: shrunken shapes on the CPU, figures not comparable with the references" if dry_run else ""))


def table(rows: list[Row]) -> str:
    lines = ["| # | check | measured | reference | ratio | status |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r.check):  # an error message may hold a "|"
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in dataclasses.astuple(row)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", default=os.environ.get("SMALL") == "1",
                        help="shrunken shapes on the CPU (also SMALL=1)")
    parser.add_argument("--out", default="bench_out/gpu", help="where the table and its JSON are written")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run `bash bench/gpu_check.sh --dry_run` for the CPU rehearsal")
        return 2
    cases = SMALL if args.dry_run else FULL
    status = "CPU dry run" if args.dry_run else "ok"
    print(environment(args.dry_run), flush=True)
    runs = [
        ([(1, "no host sync: " + cases["qwen"].name), (2, "MFU: " + cases["qwen"].name),
          (5, "peak memory: " + cases["qwen"].name)], lambda: run_step(cases["qwen"], status, mfu=True, trl=False)),
        ([(3, "fused loss at Liger's shape")], lambda: run_loss(cases["loss"], status)),
        ([(1, "no host sync: " + cases["trl"].name), (4, "TRL's shape: " + cases["trl"].name),
          (5, "peak memory: " + cases["trl"].name)], lambda: run_step(cases["trl"], status, mfu=False, trl=True)),
    ]
    rows: list[Row] = []
    for checks, run in runs:
        start = time.perf_counter()
        try:
            new = run()
        except Crash as crash:
            print(f"\n{crash}\n", file=sys.stderr, flush=True)
            new = crashed_rows(checks, crash)
        rows += new
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)  # what each run costs of the device's time
        for row in new:
            print(f"  [{row.status}] {row.check} {row.name}: {row.measured}", flush=True)
    print("\n" + table(rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(environment(args.dry_run) + "\n\n" + table(rows) + "\n")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 1 if any(r.status == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
