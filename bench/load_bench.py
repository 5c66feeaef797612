"""Host memory each rank needs to load a model into FSDP2 shards with `models.load_sharded`.

    python bench/load_bench.py [--nproc 2] [--hidden 640 --layers 12 --vocab 32000]

Saves a Llama-shaped model with save_pretrained (fp32), then on every rank measures how far the peak RSS rises
above the RSS before loading, for `load_sharded` (rank 0 reads the checkpoint with from_pretrained and broadcasts;
the other ranks build the model on the meta device and receive their shards) and, in the same run, for the plain
way (every rank runs from_pretrained, then shards).
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


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.models import load_causal_lm, load_sharded, parameter_count, shard_student

    env = init_distributed()
    cfg = TrainConfig(pretrain=args.model, dataset="-", kd_coef=0.0, param_dtype="fp32")
    before = current_rss()
    if args.every_rank:  # the baseline: each rank reads the whole checkpoint, then shards it
        root = shard_student(load_causal_lm(args.model, cfg, torch.float32), cfg, env)
    else:
        root = load_sharded(args.model, cfg, env, torch.float32, shard_student, "student")
    rise = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)])
    everyone = [torch.zeros(1) for _ in range(env.world_size)]
    dist.all_gather(everyone, rise)
    if env.is_main:
        print(json.dumps({"params": parameter_count(root), "rise": [t.item() for t in everyone]}))
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

    LlamaForCausalLM(model_config(args.hidden, args.layers, args.vocab)).save_pretrained(args.model)
    ours = run_worker(__file__, args.nproc, ["--worker", f"--model={args.model}"])
    baseline = run_worker(__file__, args.nproc, ["--worker", "--every_rank", f"--model={args.model}"])
    full = ours["params"] * 4
    print(f"model {ours['params'] / 1e6:.1f}M parameters = {full / 2**20:.0f} MiB in fp32, {args.nproc} ranks; "
          "peak RSS rise while loading, in multiples of the model's size")
    print("| rank | load_sharded (rank 0 reads, broadcasts) | every rank runs from_pretrained |")
    print("|---|---|---|")
    for rank, (a, b) in enumerate(zip(ours["rise"], baseline["rise"])):
        print(f"| {rank} | {a / 2**20:.0f} MiB ({a / full:.2f}×) | {b / 2**20:.0f} MiB ({b / full:.2f}×) |")


if __name__ == "__main__":
    main()
