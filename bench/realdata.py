"""Where the benchmarks find the real tokenizers and data sets laid out as in ../shared/realdata (see its README).

`$FSDP_KD_TEST_ASSETS` first, then `../shared/realdata` beside the checkout; the same order as the tests
(tests/assets.py), which may also fetch them from the Hugging Face hub. A benchmark measures the exact files it is
given, so it does not download stand-ins: it stops with one line instead.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "FSDP_KD_TEST_ASSETS"
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "realdata")


def realdata(name: str) -> str:
    """Path of `name` (e.g. "tok_qwen2.5_instruct", "gsm8k/train.jsonl"); exits with one line if it is nowhere."""
    for root in (os.environ.get(ENV_VAR), SHARED):
        if root and os.path.exists(os.path.join(root, name)):
            return os.path.normpath(os.path.join(root, name))
    sys.exit(f"error: real asset {name} not found: set {ENV_VAR}=<dir laid out like shared/realdata> or put "
             f"shared/realdata beside the checkout ({os.path.normpath(SHARED)})")
