"""The one way the benchmark drivers start their workers: `torchrun` over this repo, the result as a JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def run_worker(script: str, nproc: int, args: list[str]) -> dict:
    """Runs `torchrun --nproc_per_node nproc script args` (one thread per rank unless OMP_NUM_THREADS says
    otherwise) and returns the last JSON object that rank 0 printed; exits with the workers' stderr on failure.
    The workers import this repo first, then whatever the caller's PYTHONPATH holds (wheels carried to a GPU
    machine, the GPU check's dry-run shim)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script, *args]
    path = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{os.path.basename(script)} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def add_shape_args(parser, hidden: int, layers: int, vocab: int, nproc: int = 2) -> None:
    """The options every driver takes: how many ranks, and the Llama-shaped model's size."""
    parser.add_argument("--nproc", type=int, default=nproc)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=vocab)
