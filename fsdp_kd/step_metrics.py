"""A step's metrics: summed on the device over its micro-batches, then summed over the ranks and read to the host in
one transfer, the step's only one, as per-token means named as the teacher gives them. With several teachers
(`routed_teacher`), each one's sums over the rows routed to it follow the run's, in the same transfer, and read as
`<metric>_<name>`."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum
from .kernel import METRIC_NAMES

# summed over tokens, micro-batches and ranks, then divided by "tokens"
SUMMED = ("loss",) + METRIC_NAMES + ("tokens",)


def no_sums(device: torch.device, teachers: int = 0) -> torch.Tensor:
    """The sums of no micro-batch, ordered as SUMMED, then as SUMMED again for each of several `teachers`."""
    return torch.zeros(len(SUMMED) * (1 + teachers), dtype=torch.float64, device=device)


def summed(loss_sum: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """One micro-batch's summed loss and metrics, ordered as SUMMED; then, with several teachers, each one's
    (`metrics["by_teacher"]`, [teachers, len(SUMMED)])."""
    row = torch.stack([loss_sum.detach().double(), *(metrics[k] for k in SUMMED[1:])])
    return row if "by_teacher" not in metrics else torch.cat([row, metrics["by_teacher"].flatten()])


def reduce_sums(sums: torch.Tensor, metric_names: dict[str, str | None], extra: list[torch.Tensor] = (),
                groups: dict[str, dict[str, str | None]] | None = None) -> tuple[dict[str, float], list[float]]:
    """Global per-token means of the summed metrics (`sums`, ordered as SUMMED, on the device), each renamed by
    `metric_names` (dropped where it names None: what the teacher cannot give), and the values of `extra` (already
    global; each flattened), all in one device-to-host transfer. `groups`, with several teachers: each one's name
    and metric names, whose sums follow the run's in `sums`; its means read `<metric>_<name>`, over its rows."""
    host = torch.cat([all_reduce_sum(sums.clone()), *(e.reshape(-1).double() for e in extra)]).tolist()
    out = {metric_names.get(k, k): v for k, v in _means(host[:len(SUMMED)]).items()
           if metric_names.get(k, k) is not None}
    for g, (name, names) in enumerate((groups or {}).items(), 1):
        means = _means(host[g * len(SUMMED):(g + 1) * len(SUMMED)])
        out.update({f"{k}_{name}": v for k, v in means.items() if names.get(k, k) is not None})
    return out, host[sums.numel():]


def _means(sums: list[float]) -> dict[str, float]:
    """Per-token means of one SUMMED row, and its token count."""
    totals = dict(zip(SUMMED, sums))
    tokens = max(totals["tokens"], 1.0)
    return {**{k: totals[k] / tokens for k in ("loss", *METRIC_NAMES)}, "tokens": totals["tokens"]}
