"""The compute dtype of a run's models, by the name `param_dtype` gives it: the names and what each means, in one
table that `--help`, validation and the models' loading all read."""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PARAM_DTYPES = ("auto", *COMPUTE_DTYPES)  # auto: bf16 on CUDA, fp32 elsewhere


def resolve_dtype(param_dtype: str, device: torch.device) -> torch.dtype:
    if param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return COMPUTE_DTYPES[param_dtype]
