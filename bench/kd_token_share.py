"""The share of trained tokens that get a KD term across tokenizers (`kd_token_share`, as metrics.jsonl logs it), and
why the others do not, on real tokenizers and real SFT data: each sample built as training builds it (the student's
chat template, responses trained: `records.record_to_sample`), the teacher's tokens and alignment as the data
pipeline stores them (`TeacherTokenization.columns`, read back by `teacher_fields`), and a trained token counted as
having a KD term where the loss gives it one (`teacher_positions` >= 0: `data.MicroBatch.aligned`).

    python bench/kd_token_share.py [--samples 500]

Uses the real tokenizers, GSM8K (its first --samples train records, question → answer) and FastChat's ShareGPT
sample conversations of ../shared/realdata (or FSDP_KD_TEST_ASSETS). Prints, per data set and ordered pair, the
share and the left-out shares by reason (`cross_tokenizer.LEFT_OUT`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

TOKENIZERS = ("tok_qwen2.5_instruct", "tok_phi3_mini_instruct", "tok_smollm_360m_instruct")


def records(paths: dict, samples: int) -> dict[str, list[dict]]:
    gsm8k = [json.loads(line) for line in itertools.islice(open(paths["gsm8k/train.jsonl"]), samples)]
    sharegpt = json.load(open(paths["fastchat/dummy_conversation.json"]))[:samples]
    return {"GSM8K": [{"input": r["question"], "output": r["answer"]} for r in gsm8k],
            "ShareGPT": [{"input": r["conversations"]} for r in sharegpt]}


def main() -> None:
    from transformers import AutoTokenizer

    from assets import _resolve
    from fsdp_kd.cross_tokenizer import LEFT_OUT, TeacherTokenization, TokenBytes
    from fsdp_kd.records import IGNORE_INDEX, TokenSettings, record_to_sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--max_len", type=int, default=2048)
    args = parser.parse_args()
    paths = {name: _resolve(name) for name in TOKENIZERS + ("gsm8k/train.jsonl", "fastchat/dummy_conversation.json")}
    if any(p is None for p in paths.values()):
        sys.exit("the real tokenizers, GSM8K and ShareGPT are needed (../shared/realdata, or FSDP_KD_TEST_ASSETS)")
    loaded = {name: AutoTokenizer.from_pretrained(paths[name]) for name in TOKENIZERS}
    vocabs = {name: TokenBytes.of(tok) for name, tok in loaded.items()}
    data = records(paths, args.samples)
    for dataset, rows in data.items():
        settings = TokenSettings("input", "output", None, apply_chat_template=True, multiturn=dataset == "ShareGPT",
                                 pretrain_mode=False, max_len=args.max_len, skip_bad_rows=False)
        print(f"\n{dataset}: {len(rows)} records, the student's chat template, responses trained")
        print("| student → teacher | trained tokens | kd_token_share | " +
              " | ".join(LEFT_OUT.values()) + " |")
        print("|---|---|---|" + "---|" * len(LEFT_OUT))
        for s, t in itertools.permutations(TOKENIZERS, 2):
            retokenize = TeacherTokenization(vocabs[s], vocabs[t], loaded[t])
            positions = []
            for i, record in enumerate(rows):
                sample, _ = record_to_sample(record, settings, loaded[s], f"{dataset}:{i}")
                at = np.asarray(retokenize.fields(sample.input_ids)["teacher_positions"])
                positions.append(at[np.asarray(sample.targets) != IGNORE_INDEX])
            at = np.concatenate(positions)
            left = " | ".join(f"{(at == code).mean():.2%}" for code in LEFT_OUT)
            print(f"| {s.removeprefix('tok_')} → {t.removeprefix('tok_')} | {len(at)} | {(at >= 0).mean():.2%} | "
                  f"{left} |")


if __name__ == "__main__":
    main()
