"""fsdp-kd: knowledge distillation for causal language models on FSDP2, in pure PyTorch."""

from .startup import CLOCK as _CLOCK  # noqa: F401  started here, at the entry point's first import (see startup.py)
