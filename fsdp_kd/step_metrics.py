"""A step's metrics: summed on the device over its micro-batches, then summed over the ranks and read to the host in
one transfer, the step's only one, as means named as the teacher gives them: the loss, CE and KD term per trained
token, the teacher's metrics (KL, entropies, top-1, teacher CE) per token with a KD term (`KD_ROW_MEANS`), and the
share of trained tokens that have one (`kd_token_share`: 1 for a live teacher of the same tokenizer, 0 without a
teacher, below 1 across tokenizers where a row has no teacher term). With several teachers (`routed_teacher`), each
one's sums over the rows routed to it follow the run's, in the same transfer, and read as `<metric>_<name>`."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum
from .kernel import METRIC_NAMES

# summed over tokens, micro-batches and ranks, then divided by "tokens", or by "kd_tokens" (KD_ROW_MEANS)
SUMMED = ("loss",) + METRIC_NAMES + ("tokens",)
# the metrics that describe the teacher at a row, so only the rows with a KD term have them: a mean over those rows
# (with a live teacher of the same tokenizer every row has one, and this is the per-token mean)
KD_ROW_MEANS = ("kl", "teacher_entropy", "student_entropy", "top1_agreement", "teacher_ce")
COUNTS = ("kd_tokens", "span_tokens")  # logged as counts (the share of both), not as means


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
    out = _means(host[:len(SUMMED)], metric_names)
    for g, (name, names) in enumerate((groups or {}).items(), 1):
        means = _means(host[g * len(SUMMED):(g + 1) * len(SUMMED)], names, rename=False)
        out.update({f"{k}_{name}": v for k, v in means.items()})
    return out, host[sums.numel():]


def _means(sums: list[float], names: dict[str, str | None], rename: bool = True) -> dict[str, float]:
    """The means of one SUMMED row (renamed by `names`, or only dropped where it names None), its counts and its
    `kd_token_share`."""
    totals = dict(zip(SUMMED, sums))
    tokens, kd_tokens = max(totals["tokens"], 1.0), max(totals["kd_tokens"], 1.0)
    means = {k: totals[k] / (kd_tokens if k in KD_ROW_MEANS else tokens) for k in ("loss", *METRIC_NAMES)
             if k not in COUNTS}
    out = {(names.get(k, k) if rename else k): v for k, v in means.items() if names.get(k, k) is not None}
    out.update(tokens=totals["tokens"], kd_tokens=totals["kd_tokens"],
               kd_token_share=(totals["kd_tokens"] + totals["span_tokens"]) / tokens)
    if names.get("span_tokens") is not None:  # a teacher that teaches groups of several tokens
        out[names["span_tokens"] if rename else "span_tokens"] = totals["span_tokens"]
    return out
