"""The teacher on ranks of its own against co-location, and the hidden-state cache against top-k and live.

    python bench/teacher_ranks_bench.py [--nproc 2 --steps 5 --micro 2 --accumulation 2 --max_len 512]

Real SmolLM tokenizer (vocabulary 49152) and GSM8K from ../shared/realdata; random Llama-shaped models built here
(student hidden 256 × 4 layers, teacher 512 × 8, the vocabulary's head on both). Every run is train.py's own path
(`Trainer`, or `teacher_ranks.serve` on a teacher rank), one `torchrun` each, the same global batch of
micro × accumulation × nproc samples:
  co-located   nproc ranks, each holding a shard of both models (teacher_ranks 0)
  split        nproc - 1 student ranks and 1 teacher rank (teacher_ranks 1)
  topk64       nproc ranks training from a top-k cache (k = 64), built first with cache_teacher
  hidden       nproc ranks training from a hidden-state cache (bf16), built first with cache_teacher
For each: the median step time over the steps after the first two, each rank's peak memory (CUDA allocator peak,
or max RSS on CPU, where the Python process itself is most of it), and the bytes per trained token that reach the
student's loss: over the wire from the teacher rank (as the teacher rank counts them), read from the cache (its
size over its tokens), against the fp32 logits a teacher would otherwise hand over (4·V).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.launch import REPO, run_worker  # noqa: E402
from bench.realdata import realdata  # noqa: E402


def worker(argv: list[str]) -> None:
    """One run under torchrun: train.py's keys in `argv`; rank 0 prints every rank's step times and peak memory."""
    import torch
    import torch.distributed as dist

    from fsdp_kd.cli import serve_teacher
    from fsdp_kd.config import parse_config
    from fsdp_kd.distributed import init_distributed, split_world, teardown
    from fsdp_kd.preemption import StopSignals
    from fsdp_kd.routing import rank_blocks
    from fsdp_kd.trainer import Trainer

    cfg = parse_config(argv)
    env = init_distributed()
    side = split_world(env, rank_blocks(cfg), cfg.dist_timeout_minutes) if cfg.teacher_ranks else env
    times: list[float] = []
    served = None
    if side.split is not None and side.split.is_teacher(side.global_rank):
        served = serve_teacher(cfg, side, StopSignals())  # never installed: a bench run is not preempted
        role = "teacher"
    else:
        trainer = Trainer(cfg, side, log=lambda *a, **k: None)
        times.append(time.perf_counter())
        trainer.train(on_step=lambda done, total: times.append(time.perf_counter()))
        trainer.close(failed=False)
        role = "student" if cfg.teacher_ranks else "rank"
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(env.device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [b - a for a, b in zip(times, times[1:])]
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, {"rank": env.rank, "role": role, "peak_gb": peak / 1024**3, "steps": steps,
                                       "served": served})
    if env.rank == 0:
        print(json.dumps({"ranks": everyone}), flush=True)
    teardown()


def run(args, name: str, flags: dict, nproc: int) -> dict:
    """A run's median step time (after the first two steps) and each rank's peak memory."""
    argv = [item for k, v in flags.items() for item in (f"--{k}", str(v))]
    ranks = run_worker(__file__, nproc, ["--worker", *argv])["ranks"]
    steps = [s for r in ranks for s in r["steps"][2:] if r["role"] != "teacher"]
    result = {"run": name, "step_s": statistics.median(steps),
              "peak_gb": {f"{r['role']} {r['rank']}": round(r["peak_gb"], 3) for r in ranks}}
    served = [r["served"] for r in ranks if r["served"]]
    if served:  # the hidden states that came over the wire, and the inputs that went
        result["bytes_per_token"] = sum(s["sent"] for s in served) / max(sum(s["tokens"] for s in served), 1)
        result["inputs_per_token"] = sum(s["received"] for s in served) / max(sum(s["tokens"] for s in served), 1)
    print(json.dumps(result), flush=True)
    return result


def build_models(out: str) -> tuple[str, str]:
    from transformers import AutoTokenizer

    from fsdp_kd.testing.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(realdata("tok_smollm_360m_instruct"))
    paths = []
    for role, hidden, layers, seed in (("student", 256, 4, 2), ("teacher", 512, 8, 1)):
        path = os.path.join(out, role)
        build_tiny_model(path, len(tok), hidden, layers, seed=seed)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def build_cache(flags: dict, directory: str, nproc: int, mode_flags: dict):
    """cache_teacher over the run's data; returns the cache's record (its bytes and tokens)."""
    from fsdp_kd.teacher_cache import CacheMeta

    argv = [item for k, v in {**flags, **mode_flags, "teacher_cache": directory}.items() for item in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m",
                          "fsdp_kd.cache_teacher", *argv], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"cache_teacher failed:\n{out.stderr[-3000:]}")
    return CacheMeta.load(directory)


def main() -> None:
    if "--worker" in sys.argv:
        return worker(sys.argv[sys.argv.index("--worker") + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2, help="per rank, co-located")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--out", default="bench_out/teacher_ranks")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    student, teacher = build_models(args.out)
    samples = args.micro * args.accumulation * args.nproc * args.steps
    base = {"pretrain": student, "teacher_model": teacher, "dataset": realdata("gsm8k/train.jsonl"),
            "input_key": "question", "output_key": "answer", "max_len": args.max_len, "max_samples": samples,
            "micro_train_batch_size": args.micro, "train_batch_size": args.micro * args.accumulation * args.nproc,
            "max_steps": args.steps, "kd_coef": 0.5, "logging_steps": args.steps, "save_steps": -1}
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(student))
    print(f"vocabulary {vocab}; {args.nproc} ranks; a step is {base['train_batch_size']} GSM8K samples "
          f"(micro-batch {args.micro}); {args.steps} steps per run, the first two not timed", flush=True)
    results = [run(args, "co-located", {**base, "save_path": f"{args.out}/co"}, args.nproc),
               run(args, "split 1 teacher rank", {**base, "save_path": f"{args.out}/split", "teacher_ranks": 1},
                   args.nproc)]
    for mode, mode_flags in (("topk64", {"cache_mode": "topk", "cache_k": 64}), ("hidden", {"cache_mode": "hidden"})):
        directory = f"{args.out}/cache_{mode}"
        meta = build_cache({k: v for k, v in base.items() if k not in ("max_steps", "logging_steps", "save_steps")}
                           | {"save_path": f"{args.out}/cache_run"}, directory, args.nproc, mode_flags)
        result = run(args, f"cache {mode}", {**base, "save_path": f"{args.out}/{mode}", "teacher_cache": directory},
                     args.nproc)
        result["bytes_per_token"] = meta.bytes / max(meta.tokens, 1)
        results.append(result)
    live = results[0]["step_s"]
    split = results[1]
    print(f"\nper trained token: fp32 logits {4 * vocab} bytes; hidden states from the teacher rank "
          f"{split['bytes_per_token']:.0f} ({4 * vocab / split['bytes_per_token']:.0f}x fewer), and "
          f"{split['inputs_per_token']:.0f} bytes of inputs sent to it")
    print(f"{'run':<22}{'step s':>9}{'vs co-located':>15}{'bytes/token':>13}  peak GB per rank")
    for r in results:
        per_token = f"{r['bytes_per_token']:.0f}" if "bytes_per_token" in r else "-"
        peaks = ", ".join(f"{k} {v:.2f}" for k, v in r["peak_gb"].items())
        print(f"{r['run']:<22}{r['step_s']:>9.3f}{r['step_s'] / live:>14.2f}x{per_token:>13}  {peaks}")


if __name__ == "__main__":
    main()
