"""What re-tokenizing for a teacher of another tokenizer costs on the host: the string work that the data pipeline
does once per sample, and that on-policy training does at step time for every response the student writes
(`cross_tokenizer.TeacherTokenization.fields`: spell the student's ids, tokenize with the teacher, align by bytes).

    python bench/retokenize_bench.py [--samples 300]
    python bench/retokenize_bench.py --coverage [--samples 300]

Uses the real tokenizers and GSM8K answers of ../shared/realdata (or FSDP_KD_ASSETS); one thread. Prints, per
ordered pair, milliseconds per sample and per 1,000 student tokens, beside the teacher tokenizer's own time on the
same text (what re-tokenizing cannot go below).

With --coverage: which response tokens get a KD term, per ordered pair, on GSM8K (question → answer) and ShareGPT
(fastchat's conversations, every assistant turn), each rendered by the student's chat template as training renders
it (`records.record_to_sample`): the share taught one to one (the bucket term alone: before the span term), the
share taught at all (one to one or in a span: `kd_token_share`), and why the rest are not, by reason.
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
    parser.add_argument("--coverage", action="store_true", help="the share of response tokens taught, per pair")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.coverage:
        return coverage(args.samples)
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


def row_reasons(sample, retokenize) -> list[str]:
    """For each trained row of a sample (as the data pipeline builds it), what teaches it: "one to one", "span", or
    why nothing does (the groups read from `TeacherTokenization.columns`, as `teacher_fields` and `data` read
    them)."""
    import numpy as np

    from fsdp_kd.cross_tokenizer import Alignment, teacher_fields
    from fsdp_kd.records import IGNORE_INDEX

    t_ids, s_ends, t_ends, special = retokenize.columns(sample.input_ids)
    trained = np.asarray(sample.targets) != IGNORE_INDEX
    if not t_ids:
        return ["the sample does not align"] * int(trained.sum())
    fields = teacher_fields(t_ids, s_ends, t_ends, special, len(sample.input_ids))
    groups = Alignment(np.asarray(s_ends), np.asarray(t_ends))
    s_start, t_start = np.concatenate([[0], groups.student_ends])[:-1], np.concatenate([[0], groups.teacher_ends])[:-1]
    span_rows = {p for s0, s1, _, _ in fields["teacher_spans"] if trained[s0:s1].all() for p in range(s0, s1)}
    reasons = []
    for p in np.flatnonzero(trained):
        token = p + 1
        g = int(np.searchsorted(groups.student_ends, token, side="right"))
        if fields["teacher_positions"][p] >= 0:
            reasons.append("one to one")
        elif p in span_rows:
            reasons.append("span")
        elif g >= groups.groups or token < s_start[0]:
            reasons.append("a cut character")
        elif g in special:
            reasons.append("a special token in the group")
        elif s_start[g] == 0 or t_start[g] == 0:
            reasons.append("no position before the group")
        else:
            reasons.append("the group starts in the prompt")
    return reasons


def coverage(samples: int) -> None:
    import collections

    from transformers import AutoTokenizer

    from assets import _resolve
    from fsdp_kd.cross_tokenizer import TeacherTokenization, TokenBytes
    from fsdp_kd.records import TokenSettings, record_to_sample

    paths = {name: _resolve(name) for name in TOKENIZERS + ("gsm8k/train.jsonl", "fastchat/dummy_conversation.json")}
    if any(p is None for p in paths.values()):
        sys.exit("the real tokenizers, GSM8K and fastchat's ShareGPT are needed (../shared/realdata, or FSDP_KD_ASSETS)")
    sources = {
        "GSM8K": (TokenSettings("question", "answer", None, True, False, False, 4096, False),
                  [json.loads(line) for line in itertools.islice(open(paths["gsm8k/train.jsonl"]), samples)]),
        "ShareGPT": (TokenSettings("conversations", "", None, True, True, False, 4096, False),
                     json.load(open(paths["fastchat/dummy_conversation.json"]))[:samples]),
    }
    loaded = {name: AutoTokenizer.from_pretrained(paths[name]) for name in TOKENIZERS}
    vocabs = {name: TokenBytes.of(tok) for name, tok in loaded.items()}
    print(f"the first {samples} samples of each source; response tokens as trained (the student's chat template)")
    print("| source | student → teacher | response tokens | one to one | taught (one to one or span) | not taught, "
          "by reason |")
    print("|---|---|---|---|---|---|")
    for source, (settings, records) in sources.items():
        for s, t in itertools.permutations(TOKENIZERS, 2):
            retokenize = TeacherTokenization(vocabs[s], vocabs[t], loaded[t])
            counts = collections.Counter()
            for i, record in enumerate(records):
                sample, _ = record_to_sample(record, settings, loaded[s], f"{source}:{i}")
                counts.update(row_reasons(sample, retokenize))
            total = sum(counts.values())
            rest = ", ".join(f"{reason} {n / total:.2%}" for reason, n in counts.most_common()
                             if reason not in ("one to one", "span")) or "none"
            print(f"| {source} | {s.removeprefix('tok_')} → {t.removeprefix('tok_')} | {total} | "
                  f"{counts['one to one'] / total:.1%} | {(counts['one to one'] + counts['span']) / total:.1%} | "
                  f"{rest} |", flush=True)


if __name__ == "__main__":
    main()
