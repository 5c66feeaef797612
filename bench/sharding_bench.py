"""Resident parameter + gradient + optimizer-state bytes per rank, 1 rank against N, under the trainer's sharding.

    python bench/sharding_bench.py [--nproc 2] [--hidden 384 --layers 4 --vocab 49152]

Counts the bytes of each rank's local shards (DTensor.to_local) after one AdamW step, so every state exists. Full
sharding should put about 1/N of them on each rank (goal at N=2: at most 0.55× of one rank); the teacher's shards
are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.launch import add_shape_args, run_worker  # noqa: E402


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from bench.step_bench import model_config
    from fsdp_kd.config import TrainConfig
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.sharding import StudentSharding, TeacherSharding

    env = init_distributed()
    torch.manual_seed(0)
    cfg = TrainConfig(pretrain="-", dataset="-", teacher_model="-", param_dtype="fp32", teacher_offload=args.offload)
    student = StudentSharding.of(cfg).shard(LlamaForCausalLM(model_config(args.hidden, args.layers, args.vocab)), env)
    teacher = TeacherSharding.of(cfg).shard(LlamaForCausalLM(model_config(args.hidden * 2, args.layers, args.vocab)),
                                            env)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (1, 64))
    student(lambda lm, x: lm(input_ids=x).logits.float().mean(), ids).backward()
    optimizer.step()
    sizes = torch.tensor([float(local_bytes(student.parameters())),
                          float(local_bytes(p.grad for p in student.parameters() if p.grad is not None)),
                          float(local_bytes(v for state in optimizer.state.values() for v in state.values()
                                            if torch.is_tensor(v) and v.dim() > 0)),
                          float(local_bytes(teacher.parameters()))])
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if env.is_main:
        print(json.dumps(dict(zip(("params", "grads", "optim", "teacher"), sizes.tolist()))))
    teardown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, hidden=384, layers=4, vocab=49152)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    flags = ["--worker", f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}"]
    rows = {n: run_worker(__file__, n, flags) for n in (1, args.nproc)}
    print("| ranks | student params | grads | AdamW state | student total | teacher params |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        total = r["params"] + r["grads"] + r["optim"]
        print(f"| {n} | {r['params'] / 2**20:.1f} MiB | {r['grads'] / 2**20:.1f} MiB | {r['optim'] / 2**20:.1f} MiB | "
              f"{total / 2**20:.1f} MiB | {r['teacher'] / 2**20:.1f} MiB |")
    one, many = rows[1], rows[args.nproc]
    ratio = sum(many[k] for k in ("params", "grads", "optim")) / sum(one[k] for k in ("params", "grads", "optim"))
    print(f"student bytes per rank at {args.nproc} ranks / 1 rank: {ratio:.3f}×; teacher: "
          f"{many['teacher'] / one['teacher']:.3f}×")


if __name__ == "__main__":
    main()
