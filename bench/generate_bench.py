"""On-policy generation: one `decode` per step and rank against the previous path, transformers' `generate` once per
micro-batch, in the same run.

    python bench/generate_bench.py [--nproc 2 --steps 2 --prompts 8 --new_tokens 128 --micro 1,8]
    python bench/generate_bench.py --layers 4 --new_tokens 16 --steps 1      # a quick look

A SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocabulary 49152, tied
embeddings; random weights, the same on every rank) sharded over `nproc` ranks as the student is (FSDP2), `prompts`
GSM8K questions per rank and step in the SmolLM chat template (the tokenizer and GSM8K from ../shared/realdata),
`new_tokens` new tokens sampled at temperature 1, stopping at the tokenizer's stop ids (a random model rarely
samples them: nearly every response is full length).

  new        `on_policy.generate`: the rank's prompts in one batch, the student gathered once, the static-cache loop
             (`fsdp_kd.decode`); what a step does whatever the micro-batch size.
  previous   per micro-batch of `micro` prompts: the student gathered, then transformers' `generate` (dynamic cache,
             a host sync per token), as `OnPolicy.rewrite` did before (`fsdp_kd.testing.reference.hf_generate`).

Tokens per second count every rank's generated tokens over the slowest rank's time, after one warm-up step per path.
Host syncs per generated token: `SyncDetector` around the new path at n and 2n tokens on rank 0, the difference over
the extra tokens (the rest is per generation: the final read of the tokens, one read per stop check). The last line:
    generation: X tok/s vs the previous path Y tok/s = R× at micro-batch 1; X tok/s vs Y tok/s = R× at micro-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

from bench.launch import run_worker  # noqa: E402
from bench.realdata import realdata  # noqa: E402

TOKENIZER = "tok_smollm_360m_instruct"


def smollm2_135m(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                       max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
                       pad_token_id=2, bos_token_id=1, eos_token_id=2)


def gsm8k_prompts(tokenizer, count: int) -> list[list[int]]:
    with open(realdata("gsm8k/train.jsonl")) as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(count), f)]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False), add_special_tokens=False)["input_ids"]
            for q in questions]


def worker(args) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from fsdp_kd.config import TrainConfig
    from fsdp_kd.distributed import init_distributed, teardown
    from fsdp_kd.dtypes import resolve_dtype
    from fsdp_kd.on_policy import GenerationSettings, gathered, generate, row_seed, stop_token_ids
    from fsdp_kd.sharding import StudentSharding
    from fsdp_kd.testing.profiling import SyncDetector
    from fsdp_kd.testing.reference import hf_generate
    from fsdp_kd.tokenizer_compat import load_tokenizer

    env = init_distributed()
    tok = load_tokenizer(realdata(TOKENIZER), False)
    per_step = args.prompts * env.world_size
    prompts = gsm8k_prompts(tok, per_step * (args.steps + 1))
    torch.manual_seed(0)
    with env.device:
        lm = AutoModelForCausalLM.from_config(smollm2_135m(args))
    cfg = TrainConfig(pretrain="-", dataset="-", param_dtype=args.param_dtype)
    root = StudentSharding.of(cfg).shard(lm.to(resolve_dtype(cfg.param_dtype, env.device)), env)
    settings = GenerationSettings(args.new_tokens, 1.0, 1.0, stop_token_ids(tok), 4096, tok.pad_token_id,
                                  vocab_size=len(tok), check_every=args.check_every, compile=args.compile)

    def mine(step: int) -> list[list[int]]:
        start = step * per_step + env.rank * args.prompts
        return prompts[start:start + args.prompts]

    def new(step: int, s: GenerationSettings) -> list[list[int]]:
        seeds = [row_seed(0, step, 0, env.rank, row) for row in range(args.prompts)]
        return generate(root, mine(step), s, seeds, env.device)[0]

    def previous(step: int, s: GenerationSettings, micro: int) -> list[list[int]]:
        out = []
        for i in range(0, args.prompts, micro):
            with gathered(root):
                root.lm.eval()
                out += hf_generate(root.lm, mine(step)[i:i + micro], s, row_seed(0, step, i, env.rank, 0))
        return out

    paths = {"new": new, **{f"previous_{micro}": (lambda step, s, m=micro: previous(step, s, m))
                            for micro in args.micro}}
    warm = dataclasses.replace(settings, max_new_tokens=args.warmup_tokens)
    for path in paths.values():  # warm-up on the spare prompts, a few tokens each
        path(args.steps, warm)
    wall = {name: 0.0 for name in paths}
    cpu = dict(wall)
    tokens = {name: 0 for name in paths}
    for step in range(args.steps):  # the paths take turns, so that a shared machine's load drifts over all of them
        for name, path in paths.items():
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens[name] += sum(map(len, path(step, settings)))
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu
    result = {}
    for name in paths:
        totals = torch.tensor([wall[name], cpu[name], tokens[name]], dtype=torch.float64)
        slowest = totals[:2].clone().to(env.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        count = totals[2:].clone().to(env.device)
        dist.all_reduce(count)
        result[name] = (float(slowest[0]), float(slowest[1]), int(count))

    def syncs(new_tokens: int) -> int:
        short = dataclasses.replace(settings, max_new_tokens=new_tokens, stop_ids=(-1,))  # every row full length
        with SyncDetector() as detector:
            generate(root, mine(0), short, list(range(args.prompts)), env.device)  # placements learned
            with detector.counting():
                generate(root, mine(0), short, list(range(args.prompts)), env.device)
        return len(detector.events), detector.report()

    n = max(2, min(args.check_every - 1, 8) // 2)  # no stop check below check_every tokens
    (once, report), (twice, _) = syncs(n), syncs(2 * n)
    result["syncs_per_token"] = (twice - once) / (n * args.prompts)
    result["syncs_per_generation"] = once
    result["sync_report"] = report
    result["device"] = str(env.device)
    if env.rank == 0:
        print(json.dumps(result))
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rank and step")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--micro", default="1,8", help="the previous path's micro-batch sizes, comma-separated")
    parser.add_argument("--warmup_tokens", type=int, default=8, help="new tokens of each path's warm-up step")
    parser.add_argument("--check_every", type=int, default=16, help="generate_stop_check_every")
    parser.add_argument("--compile", action="store_true", help="generate_compile (CUDA graphs on CUDA)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--param_dtype", default="auto",
                        help="train.py's param_dtype: auto is bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.micro = [int(m) for m in args.micro.split(",")]
    if args.worker:
        worker(args)
        return
    realdata(TOKENIZER), realdata("gsm8k/train.jsonl")  # one line and out, before any worker starts
    r = run_worker(__file__, args.nproc, ["--worker", *sys.argv[1:]])
    seconds, cpu_seconds, tokens = r["new"]
    print(f"{args.nproc} ranks on {r['device']}, {args.prompts} prompts per rank and step, {args.new_tokens} new "
          f"tokens, {args.layers} layers, {args.steps} timed steps (the paths take turns)")
    print(f"| path | tokens | seconds | tok/s | CPU seconds of the busiest rank |\n|---|---|---|---|---|\n"
          f"| new (one decode per step) | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} | {cpu_seconds:.2f} |")
    lines, cpu_lines = [], []
    for micro in args.micro:
        old_seconds, old_cpu, old_tokens = r[f"previous_{micro}"]
        print(f"| previous, micro-batch {micro} | {old_tokens} | {old_seconds:.2f} | {old_tokens / old_seconds:.1f} | "
              f"{old_cpu:.2f} |")
        lines.append(f"{tokens / seconds:.1f} tok/s vs the previous path {old_tokens / old_seconds:.1f} tok/s = "
                     f"{(tokens / seconds) / (old_tokens / old_seconds):.2f}× at micro-batch {micro}")
        cpu_lines.append(f"{(tokens / cpu_seconds) / (old_tokens / old_cpu):.2f}× at micro-batch {micro}")
    print("per CPU second (what the load of other processes does not change): " + ", ".join(cpu_lines))
    print(f"host syncs per generated token: {r['syncs_per_token']:g}; per generation, whatever its length: "
          f"{r['sync_report']}")
    print("generation: " + "; ".join(lines))


if __name__ == "__main__":
    main()
