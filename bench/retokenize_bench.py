"""What re-tokenizing for a teacher of another tokenizer costs on the host: the string work that the data pipeline
does once per sample, and that on-policy training does at step time for every response the student writes
(`cross_tokenizer.TeacherTokenization.fields`: spell the student's ids, tokenize with the teacher, align by bytes).

    python bench/retokenize_bench.py [--samples 300]

Uses the real tokenizers and GSM8K answers of ../shared/realdata (or FSDP_KD_ASSETS); one thread. Prints, per
ordered pair, milliseconds per sample and per 1,000 student tokens, beside the teacher tokenizer's own time on the
same text (what re-tokenizing cannot go below).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

TOKENIZERS = ("tok_qwen2.5_instruct", "tok_phi3_mini_instruct", "tok_smollm_360m_instruct")


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from assets import _resolve
    from fsdp_kd.cross_tokenizer import TeacherTokenization, TokenBytes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = {name: _resolve(name) for name in TOKENIZERS + ("gsm8k/train.jsonl",)}
    if any(p is None for p in paths.values()):
        sys.exit("the real tokenizers and GSM8K are needed (../shared/realdata, or FSDP_KD_ASSETS)")
    texts = [json.loads(line)["answer"] for line in itertools.islice(open(paths["gsm8k/train.jsonl"]), args.samples)]
    loaded = {name: AutoTokenizer.from_pretrained(paths[name]) for name in TOKENIZERS}
    vocabs = {name: TokenBytes.of(tok) for name, tok in loaded.items()}
    print(f"{len(texts)} GSM8K answers; one thread")
    print("| student → teacher | ms per sample | ms per 1k student tokens | teacher tokenizer alone, ms per sample |")
    print("|---|---|---|---|")
    for s, t in itertools.permutations(TOKENIZERS, 2):
        retokenize = TeacherTokenization(vocabs[s], vocabs[t], loaded[t])
        ids = [loaded[s](text, add_special_tokens=False)["input_ids"] for text in texts]
        retokenize.fields(ids[0])  # its once-per-run setup (the teacher's tokenizer copied to split special tokens)
        started = time.perf_counter()
        for sample in ids:
            retokenize.fields(sample)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        for text in texts:
            loaded[t](text, add_special_tokens=False)
        alone = time.perf_counter() - started
        tokens = sum(map(len, ids))
        print(f"| {s.removeprefix('tok_')} → {t.removeprefix('tok_')} | {1e3 * seconds / len(ids):.2f} | "
              f"{1e6 * seconds / tokens:.2f} | {1e3 * alone / len(texts):.2f} |")


if __name__ == "__main__":
    main()
