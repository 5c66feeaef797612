"""The tokenized data path at a million-sample scale: build once, start fast, memory flat in the dataset size.

    python bench/data_bench.py [--sizes 10000,500000] [--source gsm8k|sharegpt] [--workdir /tmp/fsdp_kd_data_bench]
    python bench/data_bench.py --chat_mask_only

The real GSM8K (or ShareGPT) file from $FSDP_KD_TEST_ASSETS or ../shared/realdata (bench/realdata.py) is repeated to
each size as JSONL and tokenized with the Qwen2.5 chat template. For each size, in fresh processes:
  build     the first start: `open_tokenized` tokenizes into the cache (datasets.map, all cores)
  start     a second start on the cache, as every rank does: open the table, the epoch order, the step sampler,
            and collate the first step's micro-batches. Wall time of the whole process (imports included), and the
            process's RSS and anonymous RSS afterwards.
and, for comparison, the in-memory path this replaced (every record tokenized into Python lists on every rank) at
the smallest size only.

Then the chat-mask cost per token of a 20-turn conversation against a 1-turn one, for the one-rendering mask
(`records.chat_token_mask`) and the prefix definition it replaced (`reference.prefix_chat_token_mask`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.load_bench import anonymous_rss, current_rss  # noqa: E402
from bench.realdata import realdata  # noqa: E402

TOKENIZER = realdata("tok_qwen2.5_instruct")
SOURCES = {  # name: (real asset, keys)
    "gsm8k": ("gsm8k/train.jsonl", {"input_key": "question", "output_key": "answer"}),
    "sharegpt": ("fastchat/dummy_conversation.json", {"multiturn": True}),
}


def config(source: str, cache: str):
    from fsdp_kd.config import TrainConfig

    return TrainConfig(pretrain="x", dataset="x", apply_chat_template=True, max_len=1024, data_cache_dir=cache,
                       train_batch_size=64, micro_train_batch_size=8, **SOURCES[source][1])


def write_repeated(source: str, size: int, path: str) -> None:
    from fsdp_kd.records import raw_records

    lines = [text.strip() for text, _ in raw_records(realdata(SOURCES[source][0]))]
    with open(path, "w") as f:
        for i in range(size):
            f.write(lines[i % len(lines)] + "\n")


def child(args) -> None:
    """One start, in this fresh process; prints a JSON line of what it measured."""
    started = time.perf_counter()
    from fsdp_kd.config import token_settings
    from fsdp_kd.data import EpochOrder, StepSampler, collate
    from fsdp_kd.tokenizer_compat import load_tokenizer, padding_id
    from fsdp_kd.records import read_records, record_to_sample
    from fsdp_kd.tokenized import open_tokenized

    cfg = config(args.source, args.cache)
    tok = load_tokenizer(TOKENIZER, False)
    if args.child == "in_memory":
        table = [record_to_sample(r, token_settings(cfg), tok, w)[0] for r, w in read_records(args.data)]
    else:
        table = open_tokenized(args.data, "train", None, token_settings(cfg), cfg.data_cache_dir, tok, local_rank=0,
                               log=lambda *a: None)
    order = EpochOrder([len(table)], None, cfg.seed, batch_size=cfg.train_batch_size)
    sampler = StepSampler(order, cfg.micro_train_batch_size, 0, 1,
                          accumulation=cfg.train_batch_size // cfg.micro_train_batch_size)
    batches = [collate([table[i] for i in idx], padding_id(tok)) for idx in sampler.indices(0, 0)]
    print(json.dumps({"seconds": time.perf_counter() - started, "rss": current_rss(), "anon": anonymous_rss(),
                      "samples": len(table), "tokens": int(sum(b.real_tokens for b in batches))}))


def run_child(mode: str, data: str, args) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", data, "--cache", args.cache,
                          "--source", args.source], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def chat_mask_cost(turns: int, repeats: int = 5) -> tuple[float, float]:
    """µs per token of (one-rendering mask, prefix definition) for a GSM8K conversation of `turns` exchanges."""
    from fsdp_kd.tokenizer_compat import load_tokenizer
    from fsdp_kd.records import chat_token_mask, read_records
    from fsdp_kd.testing.reference import prefix_chat_token_mask

    tok = load_tokenizer(TOKENIZER, False)
    records = [r for r, _ in read_records(realdata(SOURCES["gsm8k"][0]))]
    costs = []
    for mask in (lambda m: chat_token_mask(m, tok, True, "bench"), lambda m: prefix_chat_token_mask(m, tok, True)):
        mask([{"role": "user", "content": "warm"}, {"role": "assistant", "content": "up"}])  # template compiled once
        tokens, seconds = 0, 0.0
        for rep in range(repeats):
            messages = []
            for r in records[rep * turns:(rep + 1) * turns]:
                messages += [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            t = time.perf_counter()
            ids, _ = mask(messages)
            seconds += time.perf_counter() - t
            tokens += len(ids)
        costs.append(seconds / tokens * 1e6)
    return costs[0], costs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,500000")
    parser.add_argument("--source", choices=sorted(SOURCES), default="gsm8k")
    parser.add_argument("--workdir", default="/tmp/fsdp_kd_data_bench")
    parser.add_argument("--chat_mask_only", action="store_true", help="only the chat-mask cost")
    parser.add_argument("--child", choices=["open", "in_memory"])
    parser.add_argument("--data")
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.child:
        return child(args)

    if args.chat_mask_only:
        return report_chat_mask()
    os.makedirs(args.workdir, exist_ok=True)
    args.cache = os.path.join(args.workdir, "cache")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        data = os.path.join(args.workdir, f"{args.source}_{size}.jsonl")
        write_repeated(args.source, size, data)
        build = run_child("open", data, args)
        start = run_child("open", data, args)
        rows.append((size, build, start))
        print(f"{args.source} × {size}: build {build['wall']:.1f} s ({size / build['wall']:.0f} samples/s); cached "
              f"start {start['wall']:.1f} s, RSS {start['rss'] / 2**20:.0f} MiB, anonymous "
              f"{start['anon'] / 2**20:.0f} MiB", flush=True)
    base = rows[0][2]
    for size, _, start in rows[1:]:
        print(f"RSS at {size} / at {rows[0][0]}: {start['rss'] / base['rss']:.2f}× (anonymous "
              f"{start['anon'] / base['anon']:.2f}×); goal ≤ 1.2×; cached start {start['wall']:.1f} s, goal ≤ 15 s")
    old = run_child("in_memory", os.path.join(args.workdir, f"{args.source}_{sizes[0]}.jsonl"), args)
    print(f"in-memory path (before) at {sizes[0]}: start {old['wall']:.1f} s, RSS {old['rss'] / 2**20:.0f} MiB, "
          f"anonymous {old['anon'] / 2**20:.0f} MiB (the memory-mapped start: {base['anon'] / 2**20:.0f} MiB)")

    report_chat_mask()


def report_chat_mask() -> None:
    one_new, one_old = chat_mask_cost(1)
    many_new, many_old = chat_mask_cost(20)
    print(f"chat mask, µs per token: 1 turn {one_new:.2f} (prefix definition {one_old:.2f}); 20 turns "
          f"{many_new:.2f} (prefix definition {many_old:.2f}); 20-turn / 1-turn {many_new / one_new:.2f}× (goal ≤ 2×), "
          f"prefix definition {many_old / one_old:.2f}×")


if __name__ == "__main__":
    main()
