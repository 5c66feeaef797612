"""A whole KD training step, the project's against a naive loop, on the same models, data and sharding.

    python bench/step_bench.py                  # 2 ranks, seq 1024, vocab 49152, ~45M student, ~118M teacher
    python bench/step_bench.py --nproc 2 --steps 3 --prompt_fraction 0.5
    python bench/step_bench.py --on_policy_ratio 1 --gen_tokens 64   # on-policy: generation, then the step

The driver launches `torchrun` once per implementation, so each one's peak RSS is its own:
  fsdp_kd  the trainer's step: teacher hidden states at trainable rows, then the chunked loss inside the student root
  naive    HF forward with full [tokens × vocab] logits for both models and a dense fp32 CE + KL loss
Both: FSDP2 full shard of the student and teacher, `--param_dtype` (fp32 default; bf16 on GPU), AdamW step, the
same random token batch. On CUDA the peak is the allocator's, on CPU the process's max RSS.
Each rank also times a 2048³ matmul before the steps; their sum is the machine's measured matmul throughput, and
MFU = model FLOPs per second / that, with model FLOPs = (6·N_student + 2·N_teacher + attention) per token, N without
the input embeddings (lookups), counting every token (the work a dense loop must do). `--prompt_fraction` masks the start of each sequence as a prompt: the
naive loop still projects those rows, the project's step does not.

The models are Llama-shaped by default (heads of 64, as many KV heads, MLP 8/3 of hidden, untied head); the shape
flags give real ones, e.g. Qwen2.5-0.5B: `--arch qwen2 --student_hidden 896 --student_layers 24 --student_heads 14
--student_kv_heads 2 --student_intermediate 4864 --tied --vocab 151936`. `--sync_check` ends the run with one more
step, at steady state, under `torch.cuda.set_sync_debug_mode("error")` on CUDA (or, on the CPU build, under
`fsdp_kd.testing.profiling.SyncDetector` with its own warm-up step) and reports what it saw (bench/gpu_check.py uses
it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.launch import run_worker  # noqa: E402


def model_config(hidden: int, layers: int, vocab: int, *, heads: int | None = None, kv_heads: int | None = None,
                 intermediate: int | None = None, tied: bool = False, arch: str = "llama", max_positions: int = 4096):
    """A random model's config: Llama-shaped from (hidden, layers, vocab) alone, or any shape the keywords give
    (`arch` qwen2 adds the q/k/v biases of Qwen2)."""
    from transformers import LlamaConfig, Qwen2Config

    heads = heads or hidden // 64
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 8 // 3,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=tied)


def role_config(args, role: str):
    """The student's or teacher's config from the bench's flags (`--student_hidden`, `--teacher_kv_heads`, ...)."""
    get = lambda key: getattr(args, f"{role}_{key}")  # noqa: E731
    return model_config(get("hidden"), get("layers"), args.vocab, heads=get("heads"), kv_heads=get("kv_heads"),
                        intermediate=get("intermediate"), tied=args.tied, arch=args.arch,
                        max_positions=max(4096, args.seq + args.gen_tokens))


def matmul_params(n_params: int, vocab: int, hidden: int, tied: bool) -> int:
    """Parameters that take part in a matrix product per token: all but the input embedding, which is a lookup;
    a tied embedding is the head too, so it counts once."""
    return n_params if tied else n_params - vocab * hidden


def matmul_gflops(device, dtype, size: int = 2048, repeats: int = 3) -> float:
    import torch

    if device.type == "cuda":
        size, repeats = 8192, 20
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def synced_clock(device) -> float:
    """perf_counter once the device has finished its queued work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def steady_state_syncs(step, device) -> str:
    """One more step checked for host syncs: "none", or what stalled the host and where. On CUDA the step runs
    under `set_sync_debug_mode("error")`, whose first refusal stops it (the step is the run's last, so a half-done
    one harms nothing). On the CPU build the repo's sync detector infers the syncs, after its own warm-up step;
    without one: "not applicable on CPU"."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as e:
            return f"{str(e).splitlines()[0]} at {_where(e)}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return "none"
    try:
        from fsdp_kd.testing.profiling import SyncDetector
    except ImportError:
        return "not applicable on CPU"
    with SyncDetector() as syncs:
        step()  # its warm-up: where each tensor lives is learned, nothing counted
        with syncs.counting():
            step()
    return "none" if not syncs.events else syncs.report().replace("\n", ";")


def _where(exc: BaseException) -> str:
    """'file:line function' of the innermost frame outside torch in the exception's traceback, and of the innermost
    frame of this repo when that is another one (HF code called from the repo's, say)."""
    import traceback

    import torch

    torch_dir = os.path.dirname(torch.__file__)
    repo = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(repo)]
    name = lambda f: f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"  # noqa: E731
    if not frames:
        return "?"
    return name(frames[-1]) + (f" (from {name(ours[-1])})" if ours and ours[-1] is not frames[-1] else "")


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.data import MicroBatch
    from fsdp_kd.records import IGNORE_INDEX
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.loss import LossSpec
    from fsdp_kd.distill import run_student
    from fsdp_kd.sharding import StudentSharding, TeacherSharding, parameter_count
    from fsdp_kd.dtypes import resolve_dtype
    from fsdp_kd.teacher_model import LiveTeacher
    from fsdp_kd.run_log import peak_memory_gb

    env = init_distributed()
    torch.manual_seed(0)
    with env.device:  # random weights made where they will live: a GPU initializes a 1B model in a blink
        student = AutoModelForCausalLM.from_config(role_config(args, "student"))
        teacher = AutoModelForCausalLM.from_config(role_config(args, "teacher"))
    n_student, n_teacher = parameter_count(student), parameter_count(teacher)
    cfg = TrainConfig(pretrain="-", dataset="-", kd_coef=0.5, teacher_model="-", param_dtype=args.param_dtype,
                      teacher_offload=args.teacher_offload, gradient_checkpointing=args.gradient_checkpointing)
    dtype = resolve_dtype(cfg.param_dtype, env.device)
    student_root = StudentSharding.of(cfg).shard(student, env)
    teacher_root = TeacherSharding.of(cfg).shard(teacher.to(dtype), env)
    optimizer = torch.optim.AdamW(student_root.parameters(), lr=1e-5)
    spec = LossSpec(kd_coef=0.5)
    dist.barrier()
    gflops = torch.tensor(matmul_gflops(env.device, dtype), device=env.device)
    dist.all_reduce(gflops)

    g = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[:, :int(args.seq * args.prompt_fraction)] = IGNORE_INDEX
    host_batch = MicroBatch(ids, torch.ones_like(ids), targets)
    global_tokens = float((targets != IGNORE_INDEX).sum()) * env.world_size

    def naive_loss(lm, batch, teacher_logits):
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        valid = batch.targets != IGNORE_INDEX
        log_q = F.log_softmax(logits[valid], dim=-1)
        log_p = F.log_softmax(teacher_logits[valid].float(), dim=-1)
        ce = F.nll_loss(log_q, batch.targets[valid], reduction="sum")
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        return 0.5 * ce + 0.5 * kl

    def step():
        batch = host_batch.to(env.device)  # as the trainer does each step: asynchronous from pinned memory on CUDA
        with torch.no_grad():
            if args.impl == "naive":
                teacher_out = teacher_root(lambda lm, b: lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, batch)
            else:
                teacher_out = LiveTeacher(None, args.vocab, teacher_root).targets(batch)
        if args.impl == "naive":
            loss = student_root(naive_loss, batch, teacher_out)
        else:
            loss, _ = run_student(student_root, batch, spec, args.vocab, teacher_out)
        (loss / global_tokens).backward()
        torch.nn.utils.clip_grad_norm_(student_root.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if args.impl == "on_policy":
        return on_policy_step(args, env, student_root, teacher_root, optimizer, spec, ids)

    step()  # warm-up: lazy init, optimizer state
    dist.barrier()
    start = synced_clock(env.device)
    for _ in range(args.steps):
        step()
    seconds = (synced_clock(env.device) - start) / args.steps
    dist.barrier()
    peak_gb = peak_memory_gb(env.device)
    tokens = args.batch * args.seq * env.world_size
    attention = 6 * 2 * (args.student_layers * args.student_hidden) * args.seq + \
        2 * 2 * (args.teacher_layers * args.teacher_hidden) * args.seq  # per token: QK^T and AV, fwd (+bwd)
    flops_per_token = 6 * matmul_params(n_student, args.vocab, args.student_hidden, args.tied) + \
        2 * matmul_params(n_teacher, args.vocab, args.teacher_hidden, args.tied) + attention
    syncs = steady_state_syncs(step, env.device) if args.sync_check else None
    if env.is_main:
        print(json.dumps({"impl": args.impl, "tokens_per_sec": tokens / seconds, "seconds_per_step": seconds,
                          "peak_gb": peak_gb, "model_tflops": flops_per_token * tokens / seconds / 1e12,
                          "mfu": flops_per_token * tokens / seconds / (gflops.item() * 1e9),
                          "matmul_gflops": gflops.item(), "student_params": n_student, "teacher_params": n_teacher,
                          "device": str(env.device), "syncs": syncs}))
    teardown()


def on_policy_step(args, env, student_root, teacher_root, optimizer, spec, ids) -> None:
    """Times generation (gathered once, and re-gathered per token) and the on-policy step's three parts."""
    import torch
    import torch.distributed as dist

    from fsdp_kd.data import collate
    from fsdp_kd.distill import run_student
    from fsdp_kd.distributed import teardown
    from fsdp_kd.on_policy import GenerationSettings, generate, with_response
    from fsdp_kd.run_log import peak_memory_gb
    from fsdp_kd.teacher_model import LiveTeacher

    # the last id as the only stop token: a random model almost never samples it, so every response is full length
    settings = GenerationSettings(args.gen_tokens, 1.0, 1.0, (args.vocab - 1,), args.seq + args.gen_tokens, 0)
    per_token = dataclasses.replace(settings, gather_once=False)
    prompts = [row[:args.seq // 2] for row in ids.tolist()]

    def synced(fn):
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        return out, time.perf_counter() - start

    seeds = [env.rank * len(prompts) + row for row in range(len(prompts))]
    generate(student_root, prompts, settings, seeds, env.device)  # warm-up
    times = {"generate": 0.0, "generate per token": 0.0, "teacher": 0.0, "student": 0.0}
    generated = 0
    for step in range(args.steps):
        (responses, _), seconds = synced(lambda: generate(student_root, prompts, settings, [step + s for s in seeds],
                                                        env.device))
        times["generate"] += seconds
        _, seconds = synced(lambda: generate(student_root, prompts, per_token, [step + s for s in seeds],
                                                 env.device))
        times["generate per token"] += seconds
        generated += sum(map(len, responses)) * env.world_size
        batch = collate([with_response(p, r) for p, r in zip(prompts, responses)], 0).to(env.device)
        with torch.no_grad():
            targets, seconds = synced(lambda: LiveTeacher(None, args.vocab, teacher_root).targets(batch))
        times["teacher"] += seconds

        def student_part():
            loss, _ = run_student(student_root, batch, spec, args.vocab, targets)
            (loss / batch.trainable_tokens).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, seconds = synced(student_part)
        times["student"] += seconds
    peak_gb = peak_memory_gb(env.device)  # a collective: every rank takes part
    if env.is_main:
        print(json.dumps({"impl": "on_policy", "generated": generated, "peak_gb": peak_gb,
                          **{k: v / args.steps for k, v in times.items()}}))
    teardown()


def add_step_args(parser) -> None:
    """The step-bench shape, shared with the benches that run on the same models (cache_bench)."""
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--student_hidden", type=int, default=384)
    parser.add_argument("--student_layers", type=int, default=4)
    parser.add_argument("--teacher_hidden", type=int, default=768)
    parser.add_argument("--teacher_layers", type=int, default=6)
    parser.add_argument("--param_dtype", default="fp32", choices=["fp32", "bf16"])


def add_shape_args(parser) -> None:
    """What makes the models real shapes rather than the Llama-shaped default: None derives from the hidden size."""
    for role in ("student", "teacher"):
        parser.add_argument(f"--{role}_heads", type=int, help="attention heads (default hidden / 64)")
        parser.add_argument(f"--{role}_kv_heads", type=int, help="key/value heads (default: as many as heads)")
        parser.add_argument(f"--{role}_intermediate", type=int, help="MLP width (default 8/3 of hidden)")
    parser.add_argument("--tied", action="store_true", help="input embedding and output head share one matrix")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute the student's layers")


def worker_flags(args) -> list[str]:
    """The parsed options, back as flags for a worker: switches only when on, unset options left out."""
    skip = ("impl", "nproc")
    return [f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
            if k not in skip and v is not None and v is not False]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(parser)
    add_shape_args(parser)
    parser.add_argument("--prompt_fraction", type=float, default=0.0)
    parser.add_argument("--teacher_offload", action="store_true")
    parser.add_argument("--sync_check", action="store_true", help="end with one step checked for host syncs")
    parser.add_argument("--on_policy_ratio", type=float, default=0.0, help="1: measure the on-policy step")
    parser.add_argument("--gen_tokens", type=int, default=64)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return
    flags = worker_flags(args)
    if args.on_policy_ratio > 0:
        r = run_worker(__file__, args.nproc, ["--impl", "on_policy", *flags])
        per_step = r["generate"] + r["teacher"] + r["student"]
        tokens = r["generated"] / args.steps
        print(f"{args.nproc} ranks, {args.batch} prompts of {args.seq // 2} tokens per rank, {args.gen_tokens} new "
              f"tokens each, vocabulary {args.vocab}, {args.param_dtype}")
        print("| generation | tokens/s |\n|---|---|")
        print(f"| student gathered once | {tokens / r['generate']:.0f} |")
        print(f"| re-gathered per token | {tokens / r['generate per token']:.0f} |")
        print(f"| ratio | {r['generate per token'] / r['generate']:.2f}× |")
        print("| step part | seconds | share |\n|---|---|---|")
        for part in ("generate", "teacher", "student"):
            print(f"| {part} | {r[part]:.2f} | {r[part] / per_step:.0%} |")
        return
    results = {impl: run_worker(__file__, args.nproc, ["--impl", impl, *flags]) for impl in ("naive", "fsdp_kd")}
    naive, ours = results["naive"], results["fsdp_kd"]
    print(f"{args.nproc} ranks, seq {args.seq}, batch {args.batch}/rank, vocab {args.vocab}, student "
          f"{ours['student_params'] / 1e6:.1f}M, teacher {ours['teacher_params'] / 1e6:.1f}M, prompt fraction "
          f"{args.prompt_fraction}, {args.param_dtype}, teacher offload {'on' if args.teacher_offload else 'off'}; "
          f"measured matmul throughput {ours['matmul_gflops']:.0f} GFLOP/s (all ranks)")
    print("| step | tokens/s | peak memory per rank (CUDA allocator, or max RSS on CPU) | MFU |")
    print("|---|---|---|---|")
    for name, r in (("naive (full logits, dense loss)", naive), ("fsdp_kd", ours)):
        print(f"| {name} | {r['tokens_per_sec']:.0f} | {r['peak_gb']:.2f} GB | {r['mfu']:.0%} |")
    print(f"| ratio fsdp_kd / naive | {ours['tokens_per_sec'] / naive['tokens_per_sec']:.2f}× | "
          f"{ours['peak_gb'] / naive['peak_gb']:.2f}× | |")


if __name__ == "__main__":
    main()
