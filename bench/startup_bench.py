"""Seconds from launch to the first optimizer step: fsdp-kd's `train.py` against TRL's `GKDTrainer`, same job.

    python bench/startup_bench.py [--trl_python /path/to/venv/bin/python] [--nproc 2]

The job: the demo's tiny teacher (192 × 4 layers) and student (64 × 2) over its character tokenizer, 2,000
prompt/response records of its toy task, micro-batch 4, fp32, 2 ranks on gloo, off-policy KD (TRL: lmbda 0, beta 0,
i.e. forward KL). Each side is launched by `torchrun` as a user would, and timed from the launch until rank 0
reports its first finished step. fsdp-kd also prints where its seconds went (the trainer's `start-up:` line,
`fsdp_kd/startup.py`); the rest of the wall time is torchrun and the interpreters starting. TRL is optional: install
it in a separate venv (never a dependency of the project) and pass that venv's python with --trl_python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fsdp_kd.startup import parse_line  # noqa: E402

FIRST_STEP_MARKER = "first step finished"  # what the TRL worker prints; fsdp-kd's own line is `start-up: ...`


def build_job(out: str) -> dict[str, str]:
    """The demo's tokenizer, models and task, written once under `out`."""
    from fsdp_kd.testing.tiny import build_char_tokenizer, build_tiny_model, translation_task, write_jsonl

    paths = {name: os.path.join(out, name) for name in ("teacher", "student")}
    paths["data"] = os.path.join(out, "train.jsonl")
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    tok = build_char_tokenizer(os.path.join(out, "tokenizer"))
    for name, hidden, layers, seed in (("teacher", 192, 4, 1), ("student", 64, 2, 2)):
        build_tiny_model(paths[name], len(tok), hidden, layers, seed=seed)
        tok.save_pretrained(paths[name])
    write_jsonl(paths["data"], translation_task(0, 2000, 1)[0])
    return paths


def timed_launch(python: str, args: list[str], nproc: int, ready) -> tuple[float, list[str]]:
    """Starts `python -m torch.distributed.run ... args` and returns (seconds until a stdout line satisfies
    `ready`, stdout lines so far). The run is stopped there: only the start-up is measured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *args]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if ready(line):
            seconds = time.perf_counter() - started
            proc.kill()
            proc.wait()
            return seconds, lines
    proc.wait()
    sys.exit(f"{' '.join(cmd)} ended (exit {proc.returncode}) before its first step:\n" + "\n".join(lines[-40:]))


def fsdp_kd_startup(paths: dict, out: str, nproc: int) -> tuple[float, dict[str, float]]:
    save = os.path.join(out, "fsdp_kd_run")
    shutil.rmtree(save, ignore_errors=True)
    args = [os.path.join(REPO, "train.py"), "--pretrain", paths["student"], "--teacher_model", paths["teacher"],
            "--dataset", paths["data"], "--micro_train_batch_size", "4", "--train_batch_size", str(4 * nproc),
            "--max_len", "32", "--max_steps", "50", "--kd_coef", "0.5", "--param_dtype", "fp32",
            "--save_path", save, "--data_cache_dir", os.path.join(out, "tokenized")]
    seconds, lines = timed_launch(sys.executable, args, nproc, lambda line: parse_line(line.strip()) is not None)
    return seconds, parse_line(lines[-1].strip())


def trl_startup(python: str, paths: dict, out: str, nproc: int) -> float:
    save = os.path.join(out, "trl_run")
    shutil.rmtree(save, ignore_errors=True)
    worker = os.path.join(REPO, "bench", "trl_gkd_worker.py")
    args = [worker, "--student", paths["student"], "--teacher", paths["teacher"], "--data", paths["data"],
            "--out", save]
    seconds, _ = timed_launch(python, args, nproc, lambda line: FIRST_STEP_MARKER in line)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "bench_out", "startup"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--trl_python", default=None,
                        help="a python with trl installed (default: this one, if it has trl; else TRL is skipped)")
    parser.add_argument("--warm", action="store_true",
                        help="one untimed fsdp-kd launch first, so the tokenized-data cache exists (a rerun's case)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paths = build_job(args.out)
    if args.warm:
        fsdp_kd_startup(paths, args.out, args.nproc)
    seconds, laps = fsdp_kd_startup(paths, args.out, args.nproc)
    print(f"fsdp-kd: {seconds:.1f} s from launch to the first step")
    inside = sum(laps.values())
    print(f"  {'launch, interpreter, torchrun':<32} {seconds - inside:5.1f} s")
    for stage, lap in laps.items():
        print(f"  {stage:<32} {lap:5.1f} s")
    trl_python = args.trl_python
    if trl_python is None:
        has_trl = subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0
        trl_python = sys.executable if has_trl else None
    if trl_python is None:
        print("TRL: not installed here; pass --trl_python PATH to a venv that has it")
        return
    trl_seconds = trl_startup(trl_python, paths, args.out, args.nproc)
    print(f"TRL GKDTrainer: {trl_seconds:.1f} s from launch to the first step")
    print(f"ratio fsdp-kd / TRL: {seconds / trl_seconds:.2f}")


if __name__ == "__main__":
    main()
