"""Time from SIGTERM to exit: `torchrun --nproc_per_node 2 train.py` sent SIGTERM after its third logged step.

    python bench/preempt_bench.py [--out bench_out/preempt] [--repeats 2]

Two pairs of models: the demo's (teacher 160 wide × 3 layers, student 64 × 2, its character tokenizer) and the
largest the tests use (bench/make_tiny_models.py's 128 × 4 teacher and 64 × 2 student, over the real Qwen2.5
tokenizer's 151k vocabulary; skipped with a line where that tokenizer is missing). Each run is the scheduler's case:
SIGTERM to torchrun itself, which forwards it to the ranks; they finish the step in progress, save it and exit. It
prints, per pair, the seconds from the signal to torchrun's exit, to the ranks' exit, and to the line saying the
checkpoint is complete (the step in progress finished, then the save), the save's own seconds (from that line), and the training throughput (from
metrics.jsonl) for scale. Every run also checks that a complete checkpoint was left.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fsdp_kd.testing.tiny import build_char_tokenizer, build_tiny_model, translation_task, write_jsonl  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def build(out: str) -> dict[str, tuple[str, str]]:
    """{pair name: (teacher dir, student dir)}, and the training data at out/train.jsonl."""
    from transformers import AutoTokenizer

    from bench.realdata import ENV_VAR, SHARED

    train, _, _ = translation_task(0, 512, 24)
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    pairs = {}
    char = build_char_tokenizer(os.path.join(out, "char_tok"))
    qwen_dir = next((os.path.join(r, "tok_qwen2.5_instruct") for r in (os.environ.get(ENV_VAR), SHARED)
                     if r and os.path.isdir(os.path.join(r, "tok_qwen2.5_instruct"))), None)
    specs = [("demo", char, (160, 3), (64, 2), 0.05)]
    if qwen_dir is None:
        print("largest pair skipped: tok_qwen2.5_instruct not found (see bench/realdata.py)")
    else:
        specs.append(("qwen_vocab", AutoTokenizer.from_pretrained(qwen_dir), (128, 4), (64, 2), 0.02))
    for name, tok, teacher, student, std in specs:
        dirs = []
        for role, (hidden, layers), seed in (("teacher", teacher, 1), ("student", student, 2)):
            path = os.path.join(out, f"{name}_{role}")
            if not os.path.exists(os.path.join(path, "config.json")):
                build_tiny_model(path, len(tok), hidden, layers, seed=seed, init_std=std)
                tok.save_pretrained(path)
            dirs.append(path)
        pairs[name] = tuple(dirs)
    return pairs


def _gone(pids: list[str]) -> float:
    """When the last of `pids` has exited (or is a zombie), on time.monotonic()'s clock."""
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        alive.append(pid)
            except FileNotFoundError:
                pass
        if not alive:
            return time.monotonic()
        time.sleep(0.005)


def preempt_once(teacher: str, student: str, data: str, save: str) -> dict[str, float]:
    args = ["--pretrain", student, "--teacher_model", teacher, "--dataset", data, "--train_batch_size", "16",
            "--micro_train_batch_size", "4", "--max_steps", "1000", "--max_len", "64", "--kd_coef", "0.5",
            "--logging_steps", "1", "--save_path", save]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             os.path.join(REPO, "train.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    metrics = os.path.join(save, "metrics.jsonl")
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        if proc.poll() is not None:
            sys.exit(f"the run ended before its third step:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.01)
    ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    ranks_gone = []
    watcher = threading.Thread(target=lambda: ranks_gone.append(_gone(ranks) - signalled), daemon=True)
    watcher.start()
    output, saved_at = "", float("nan")
    for line in proc.stdout:  # read as it comes: when the line saying the checkpoint is complete arrives
        output += line
        if "preempted at step" in line:
            saved_at = time.monotonic() - signalled
    proc.wait(timeout=600)
    to_exit = time.monotonic() - signalled
    watcher.join(timeout=10)
    said = re.search(r"preempted at step (\d+)/\d+ .*checkpoint (\S+) is complete \(([\d.]+)s to save\)", output)
    if said is None or not os.path.isfile(os.path.join(said.group(2), "train_state.json")):
        sys.exit(f"no complete preemption checkpoint:\n{output[-3000:]}")
    lines = [json.loads(line) for line in open(metrics)]
    return {"to_exit": to_exit, "to_saved": saved_at, "ranks_gone": ranks_gone[0] if ranks_gone else float("nan"), "save": float(said.group(3)), "step": int(said.group(1)),
            "tokens_per_sec": statistics.mean(line["tokens_per_sec"] for line in lines[1:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/preempt")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    pairs = build(args.out)
    data = os.path.join(args.out, "train.jsonl")
    for name, (teacher, student) in pairs.items():
        runs = []
        for i in range(args.repeats):
            save = os.path.join(args.out, f"run_{name}_{i}_{os.getpid()}")
            runs.append(preempt_once(teacher, student, data, save))
        exits = ", ".join(f"{r['to_exit']:.2f}" for r in runs)
        print(f"{name}: SIGTERM to torchrun's exit {statistics.median(r['to_exit'] for r in runs):.2f}s (runs: "
              f"{exits}); to the ranks' exit {statistics.median(r['ranks_gone'] for r in runs):.2f}s; to the line "
              f"saying the checkpoint is complete {statistics.median(r['to_saved'] for r in runs):.2f}s, of which "
              f"the save {statistics.median(r['save'] for r in runs):.2f}s; stopped at steps "
              f"{[r['step'] for r in runs]}; training at {statistics.median(r['tokens_per_sec'] for r in runs):.0f} "
              "tokens/s", flush=True)


if __name__ == "__main__":
    main()
