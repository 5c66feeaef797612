"""How long a checkpoint save and a resume take, for a student of about 100M parameters, under the trainer's code.

    python bench/checkpoint_bench.py [--nproc 2] [--hidden 640 --layers 12 --vocab 32000] [--out bench_out/ckpt]

Measures, with FSDP2 full sharding and AdamW state present (one step taken first):
  save         a synchronous DCP save: model + optimizer + RNG, completed and renamed
  async stall  how long training is held by an asynchronous save (staging to host memory), and its total time
  resume       building the state dicts and loading the newest checkpoint back into model and optimizer
  export       the HF export from the sharded state
Each is timed on every rank between barriers; the slowest rank counts. One run, one machine: read them as sizes,
not as constants.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.launch import add_shape_args, run_worker  # noqa: E402


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from bench.step_bench import model_config
    from fsdp_kd import checkpoint as ckpt
    from fsdp_kd.config import TrainConfig
    from fsdp_kd.testing.tiny import build_char_tokenizer
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.export import export_student
    from fsdp_kd.sharding import StudentSharding, parameter_count

    env = init_distributed()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(model_config(args.hidden, args.layers, args.vocab))
    params = parameter_count(lm)
    cfg = TrainConfig(pretrain="-", dataset="-", kd_coef=0.0, param_dtype="fp32", save_path=args.out,
                      max_ckpt_num=10)
    root = StudentSharding.of(cfg).shard(lm, env)
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-5)
    root(lambda m, x: m(input_ids=x).logits.mean(), torch.randint(0, args.vocab, (1, 32))).backward()
    optimizer.step()

    def timed(fn):
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        dist.barrier()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item(), result

    sync_writer = ckpt.CheckpointWriter(cfg.resolved_ckpt_path(), cfg.max_ckpt_num, cfg.to_dict(), env.rank,
                                        asynchronous=False, data=[], timeout_minutes=cfg.dist_timeout_minutes)
    save_s, path = timed(lambda: sync_writer.save(root, optimizer, 1))
    async_writer = ckpt.CheckpointWriter(cfg.resolved_ckpt_path(), cfg.max_ckpt_num, cfg.to_dict(), env.rank,
                                         asynchronous=True, data=[], timeout_minutes=cfg.dist_timeout_minutes)
    stall_s, _ = timed(lambda: async_writer.save(root, optimizer, 2))
    finish_s, _ = timed(async_writer.finish)
    resume_s, _ = timed(lambda: ckpt.load_checkpoint(root, optimizer, path, env.rank))
    export_dir = os.path.join(args.out, "export")
    tok = build_char_tokenizer(os.path.join(args.out, f"tokenizer_rank{env.rank}"))  # the export needs one
    export_s, _ = timed(lambda: export_student(root, lm.config, tok, export_dir, env.rank))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    if env.is_main:
        print(json.dumps({"params": params, "bytes": size, "save": save_s, "async_stall": stall_s,
                          "async_total": stall_s + finish_s, "resume": resume_s, "export": export_s}))
    teardown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser, hidden=640, layers=12, vocab=32000)
    parser.add_argument("--out", default=os.path.join("bench_out", "ckpt"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if os.path.exists(args.out):
        shutil.rmtree(args.out)  # the benchmark's own scratch directory
    r = run_worker(__file__, args.nproc, ["--worker", f"--hidden={args.hidden}", f"--layers={args.layers}",
                                          f"--vocab={args.vocab}", f"--out={args.out}"])
    print(f"student {r['params'] / 1e6:.1f}M parameters, {args.nproc} ranks, checkpoint {r['bytes'] / 2**20:.0f} MiB "
          "(fp32 weights + AdamW moments)")
    print("| operation | seconds |")
    print("|---|---|")
    for key, name in (("save", "save (synchronous)"), ("async_stall", "async save: training held for"),
                      ("async_total", "async save: until complete"), ("resume", "resume (load model + optimizer)"),
                      ("export", "HF export")):
        print(f"| {name} | {r[key]:.2f} |")


if __name__ == "__main__":
    main()
