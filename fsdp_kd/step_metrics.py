"""A step's metrics: summed on the device over its micro-batches, then summed over the ranks and read to the host in
one transfer, the step's only one, as per-token means named as the teacher gives them."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum
from .kernel import METRIC_NAMES

# summed over tokens, micro-batches and ranks, then divided by "tokens"
SUMMED = ("loss",) + METRIC_NAMES + ("tokens",)


def no_sums(device: torch.device) -> torch.Tensor:
    """The sums of no micro-batch, ordered as SUMMED."""
    return torch.zeros(len(SUMMED), dtype=torch.float64, device=device)


def summed(loss_sum: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """One micro-batch's summed loss and metrics, ordered as SUMMED."""
    return torch.stack([loss_sum.detach().double(), *(metrics[k] for k in SUMMED[1:])])


def reduce_sums(sums: torch.Tensor, metric_names: dict[str, str | None],
                extra: list[torch.Tensor] = ()) -> tuple[dict[str, float], list[float]]:
    """Global per-token means of the summed metrics (`sums`, ordered as SUMMED, on the device), each renamed by
    `metric_names` (dropped where it names None: what the teacher cannot give), and the values of `extra` (already
    global; each flattened), all in one device-to-host transfer."""
    host = torch.cat([all_reduce_sum(sums.clone()), *(e.reshape(-1).double() for e in extra)]).tolist()
    totals = dict(zip(SUMMED, host[:len(SUMMED)]))
    tokens = max(totals["tokens"], 1.0)
    out = {k: totals[k] / tokens for k in ("loss", *METRIC_NAMES)}
    out["tokens"] = totals["tokens"]
    out = {metric_names.get(k, k): v for k, v in out.items() if metric_names.get(k, k) is not None}
    return out, host[len(SUMMED):]
