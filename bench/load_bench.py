"""Host memory each rank needs to load a model into FSDP2 shards with `loading.load_sharded`.

    python bench/load_bench.py [--nproc 2] [--hidden 640 --layers 12 --vocab 32000]

Saves a Llama-shaped model with save_pretrained (fp32), then on every rank measures how far the peak RSS rises
above the RSS before loading, and the load time, for three ways, in the same run:
  own shards   `load_sharded` on safetensors: each rank reads only its slices of each tensor
  broadcast    `load_sharded` on the same weights saved as pytorch_model.bin (its fallback, and the only way before
               issue 13): rank 0 runs from_pretrained and broadcasts, the other ranks keep their slices
  every rank   every rank runs from_pretrained, then shards
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.launch import add_shape_args, run_worker  # noqa: E402


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anonymous_rss() -> int:
    """Resident anonymous memory (RssAnon): what the process allocated. File-backed pages of memory-mapped
    checkpoint files also count in RSS but are page cache the kernel can drop, so they are reported apart."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakSampler:
    """Samples RssAnon every 5 ms in a thread: the kernel keeps no peak of anonymous memory."""

    def __init__(self):
        import threading

        self.peak, self.running = anonymous_rss(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import time

        while self.running:
            self.peak = max(self.peak, anonymous_rss())
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, anonymous_rss())


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.loading import LoadSpec, load_causal_lm, load_sharded
    from fsdp_kd.sharding import StudentSharding, parameter_count

    env = init_distributed()
    cfg = TrainConfig(pretrain=args.model, dataset="-", kd_coef=0.0, param_dtype="fp32")
    import time

    before, before_anon, started = current_rss(), anonymous_rss(), time.time()
    sampler = PeakSampler()
    if args.every_rank:  # the baseline: each rank reads the whole checkpoint, then shards it
        root = StudentSharding.of(cfg).shard(load_causal_lm(args.model, LoadSpec.of(cfg), torch.float32), env)
    else:
        root = load_sharded(args.model, LoadSpec.of(cfg), env, torch.float32, StudentSharding.of(cfg), "student")
    dist.barrier()
    seconds = time.time() - started
    rise = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before),
                         float(sampler.stop() - before_anon)])
    everyone = [torch.zeros(2) for _ in range(env.world_size)]
    dist.all_gather(everyone, rise)
    if env.is_main:
        print(json.dumps({"params": parameter_count(root), "rise": [t[0].item() for t in everyone],
                          "anon": [t[1].item() for t in everyone], "seconds": seconds}))
    teardown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, hidden=640, layers=12, vocab=32000)
    parser.add_argument("--model", default=os.path.join("bench_out", "load_model"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--every_rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from transformers import LlamaForCausalLM

    from bench.step_bench import model_config

    model = LlamaForCausalLM(model_config(args.hidden, args.layers, args.vocab))
    model.save_pretrained(args.model)
    model.save_pretrained(args.model + "_bin", safe_serialization=False)
    runs = {"own shards": run_worker(__file__, args.nproc, ["--worker", f"--model={args.model}"]),
            "broadcast": run_worker(__file__, args.nproc, ["--worker", f"--model={args.model}_bin"]),
            "every rank": run_worker(__file__, args.nproc, ["--worker", "--every_rank", f"--model={args.model}"])}
    full = runs["own shards"]["params"] * 4
    shard = full / args.nproc
    print(f"model {full / 4e6:.1f}M parameters = {full / 2**20:.0f} MiB in fp32, {args.nproc} ranks (shard "
          f"{shard / 2**20:.0f} MiB); rise while loading: peak anonymous memory (sampled) / peak RSS (ru_maxrss, "
          "which also counts the memory-mapped file pages read)")
    print("| rank | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for rank in range(args.nproc):
        cells = [f"{r['anon'][rank] / 2**20:.0f} MiB ({r['anon'][rank] / shard:.2f}× shard) / "
                 f"{r['rise'][rank] / 2**20:.0f} MiB" for r in runs.values()]
        print(f"| {rank} | " + " | ".join(cells) + " |")
    print("| load time | " + " | ".join(f"{r['seconds']:.2f} s" for r in runs.values()) + " |")


if __name__ == "__main__":
    main()
