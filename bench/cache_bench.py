"""The teacher cache on the step-bench models: its size, the cost of building it, and the training step it buys.

    python bench/cache_bench.py [--nproc 2 --steps 3 --seq 1024 --vocab 49152 --k 32]

Three `torchrun` launches over the same random batch (the step bench's: vocabulary 49152, ~45M student, ~118M
teacher, FSDP2 on every rank):
  build   the live teacher forward alone (hidden states at the trained rows), then the same forward plus the
          cache's work (the chunked teacher head, top-k or sampling, the part written to disk) for top-k at
          k = 8, 32, 64, 128, sampled at n = 32 and the hidden states (bf16, the head stored once): tokens/s of
          each, and the bytes per trained token on disk
  live    the training step with the live teacher (as step_bench's fsdp_kd)
  cached  the training step from the top-k cache at --k, with no teacher model built at all
  hidden  the training step from the hidden-state cache: the teacher's head alone, whole on every rank
Peak memory is per rank (CUDA allocator, or max RSS on CPU), so the cached step's includes no teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.launch import run_worker  # noqa: E402
from bench.step_bench import add_step_args, model_config  # noqa: E402

SETTINGS = [("topk", 8), ("topk", 32), ("topk", 64), ("topk", 128), ("sampled", 32), ("hidden", None)]


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.data import MicroBatch
    from fsdp_kd.distill import run_student
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.loss import LossSpec
    from fsdp_kd.records import IGNORE_INDEX
    from fsdp_kd.dtypes import resolve_dtype
    from fsdp_kd.sharding import StudentSharding, TeacherSharding
    from fsdp_kd.teacher_cache import (CachedTeacher, CacheMeta, CacheRun, part_name, save_head, teacher_rows,
                                       write_part)
    from fsdp_kd.teacher_model import LiveTeacher
    from fsdp_kd.run_log import peak_memory_gb

    env = init_distributed()
    cfg = TrainConfig(pretrain="-", dataset="-", kd_coef=0.5, teacher_model="-", param_dtype=args.param_dtype)
    dtype = resolve_dtype(cfg.param_dtype, env.device)
    spec = LossSpec(kd_coef=0.5)
    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    keys = [("bench", env.rank * args.batch + b) for b in range(args.batch)]
    batch = MicroBatch(ids, torch.ones_like(ids), targets, sample_keys=keys).to(env.device)
    tokens = batch.trainable_tokens * env.world_size

    def meta(mode: str, slots: int, head: dict | None = None) -> CacheMeta:
        return CacheMeta(mode=mode, slots=slots, head=head, temperature=1.0, vocab_size=args.vocab,
                         log_p_dtype="float16",
                         tokenizer="bench", sources=[{"path": "random", "samples_sha256": "bench", "offset": 0,
                                                      "samples": env.world_size * args.batch}],
                         settings={}, teacher="random", samples_per_chunk=args.batch, complete=True)

    def timed(fn) -> float:
        fn()  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        dist.barrier()
        return (time.perf_counter() - start) / args.steps

    result = {}
    if args.impl in ("build", "live"):
        torch.manual_seed(0)
        teacher = TeacherSharding.of(cfg).shard(LlamaForCausalLM(model_config(args.teacher_hidden, args.teacher_layers,
                                                                              args.vocab)).to(dtype), env)
        source = LiveTeacher(None, args.vocab, teacher)
    if args.impl == "build":
        result["forward_tokens_per_sec"] = tokens / timed(lambda: source.hidden(batch))
        for mode, slots in SETTINGS:
            slots = slots or args.teacher_hidden
            directory = os.path.join(args.workdir, f"{mode}_{slots}")
            os.makedirs(directory, exist_ok=True)
            rng = torch.Generator(env.device).manual_seed(env.rank)
            head_info = None
            if mode == "hidden":
                with teacher.gathered_head() as head:
                    head_info = save_head(directory, head, args.vocab)

            def build():
                hidden = source.hidden(batch)
                with teacher.gathered_head() as head:
                    rows = teacher_rows(hidden, head, spec, args.vocab, mode, slots, rng)
                return write_part(directory, part_name(0, env.rank, env.world_size), [k[1] for k in keys],
                                  [tuple(c[b * (args.seq - 1):(b + 1) * (args.seq - 1)] for c in rows)
                                   for b in range(args.batch)], meta(mode, slots, head_info))

            seconds = timed(build)
            size = torch.tensor(float(os.path.getsize(os.path.join(directory, part_name(0, env.rank,
                                                                                       env.world_size)))))
            dist.all_reduce(size)
            result[f"{mode}_{slots}"] = {"tokens_per_sec": tokens / seconds, "bytes_per_token": float(size) / tokens}
            if env.is_main:
                meta(mode, slots, head_info).save(directory)
    else:
        torch.manual_seed(1)
        student = StudentSharding.of(cfg).shard(
            LlamaForCausalLM(model_config(args.student_hidden, args.student_layers, args.vocab)), env)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        if args.impl in ("cached", "hidden"):
            name = f"topk_{args.k}" if args.impl == "cached" else f"hidden_{args.teacher_hidden}"
            directory = os.path.join(args.workdir, name)
            source = CachedTeacher(CacheRun(directory, None, "-", 1.0, spec.divergence, {}), CacheMeta.load(directory))
            source.load(env, dtype)

        def step():
            loss, _ = run_student(student, batch, spec, args.vocab, source.targets(batch))
            (loss / tokens).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result["tokens_per_sec"] = tokens / timed(step)
    result["peak_gb"] = peak_memory_gb(env.device)
    if env.is_main:
        print(json.dumps(result))
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(parser)
    parser.add_argument("--k", type=int, default=32, choices=[s for m, s in SETTINGS if m == "topk"])
    parser.add_argument("--workdir", default="/tmp/fsdp_kd_cache_bench")
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        return worker(args)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("impl", "nproc")]
    build, live, cached, hidden = (run_worker(__file__, args.nproc, ["--impl", impl, *flags])
                                   for impl in ("build", "live", "cached", "hidden"))
    print(f"{args.nproc} ranks, seq {args.seq}, batch {args.batch}/rank, vocabulary {args.vocab} "
          f"({2 if args.vocab <= 65536 else 3}-byte ids), {args.param_dtype}")
    print("| cache | bytes per trained token | bytes per stored entry | building tokens/s | vs teacher forward |")
    print("|---|---|---|---|---|")
    for mode, slots in SETTINGS:
        slots = slots or args.teacher_hidden
        r = build[f"{mode}_{slots}"]
        print(f"| {mode} {dict(topk='k', sampled='n', hidden='H')[mode]} = {slots} | {r['bytes_per_token']:.0f} | "
              f"{r['bytes_per_token'] / slots:.2f} | {r['tokens_per_sec']:.0f} | "
              f"{r['tokens_per_sec'] / build['forward_tokens_per_sec']:.2f}× |")
    print(f"teacher forward alone: {build['forward_tokens_per_sec']:.0f} tokens/s")
    print("| training step | tokens/s | peak memory per rank |")
    print("|---|---|---|")
    print(f"| live teacher | {live['tokens_per_sec']:.0f} | {live['peak_gb']:.2f} GB |")
    print(f"| top-k cache, k = {args.k} | {cached['tokens_per_sec']:.0f} | {cached['peak_gb']:.2f} GB |")
    print(f"| hidden-state cache | {hidden['tokens_per_sec']:.0f} | {hidden['peak_gb']:.2f} GB |")
    for name, r in ((f"top-k cache, k = {args.k}", cached), ("hidden-state cache", hidden)):
        print(f"| {name} / live | {r['tokens_per_sec'] / live['tokens_per_sec']:.2f}× | "
              f"{r['peak_gb'] / live['peak_gb']:.2f}× |")


if __name__ == "__main__":
    main()
