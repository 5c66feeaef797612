"""Tiny random teacher/student pairs sized to a real tokenizer's vocabulary, for CPU runs on real data.

    python bench/make_tiny_models.py [--tokenizer DIR] [--out bench_out]

Writes <out>/tiny_<name>_teacher and <out>/tiny_<name>_student (Llama-shaped, saved with save_pretrained, with the
tokenizer beside the weights), which configs/gsm8k_smollm_tiny.yaml and the benchmarks load. The tokenizer defaults
to the real SmolLM one, from $FSDP_KD_TEST_ASSETS or ../shared/realdata (bench/realdata.py).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import AutoTokenizer  # noqa: E402

from bench.realdata import realdata  # noqa: E402
from fsdp_kd.testing.tiny import build_tiny_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the real tok_smollm_360m_instruct)")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--name", default="smollm")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or realdata("tok_smollm_360m_instruct"))
    for role, hidden, layers, seed in (("teacher", 128, 4, 1), ("student", 64, 2, 2)):
        path = os.path.join(args.out, f"tiny_{args.name}_{role}")
        build_tiny_model(path, len(tok), hidden, layers, seed=seed)
        tok.save_pretrained(path)
        print(f"{role}: {path} (hidden {hidden}, {layers} layers, vocabulary {len(tok)})")


if __name__ == "__main__":
    main()
