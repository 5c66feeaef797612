"""Samples → rank-sharded micro-batches: which samples each rank trains on at each step (over one source or an
interleaved mixture of several), and how a micro-batch is laid out (padded, or packed with attention isolation).

Samples come from `records` (one record → one sample) through `tokenized` (tokenized once, memory-mapped); this
module only ever holds the indices of a step and the few samples it reads for it.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from .config import TrainConfig
from .records import IGNORE_INDEX, DataError, Sample


class SampleTable(Protocol):
    """What training reads samples from: a tokenized source, a view of one, or several concatenated."""
    lengths: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...


class Rows:
    """Some rows of a table, in a given order (a held-out split, or the rest of it)."""

    def __init__(self, table: SampleTable, rows: Sequence[int]):
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)
        self.lengths = table.lengths[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        return self.table[int(self.rows[i])]


class Concatenated:
    """Several sources as one index space: source k's row j is at offsets[k] + j."""

    def __init__(self, parts: list[SampleTable]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.lengths = np.concatenate([p.lengths for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Sample:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][int(i - self.offsets[k])]


class EpochOrder:
    """The order in which each epoch visits the training samples, over the sources concatenated.

    An epoch is `length` samples, whole global batches of `batch_size`, and the steps train every one of them.

    One source: a fresh permutation per epoch (seeded by seed + epoch), of which the epoch takes the first `length`
    (the usual drop-last: the rest, fewer than a global batch, wait for another epoch's permutation). Several
    sources, weighted by `dataset_probs` (OpenRLHF's meaning: sampling weights over an interleaved stream): the
    sources together hold `held` samples (those with a weight), an epoch is that many draws cut down to whole global
    batches, and source k gets round(p_k × length) of them, interleaved at random. Each source is read as an endless
    stream of its own reshuffled passes, continued from epoch to epoch, so a source whose share is below its size
    sees new samples every epoch and one above it repeats whole passes. Since every draw is trained, each pass of a
    source trains each of its samples exactly once: nothing is cut or skipped. An epoch's order is a function of
    (seed, epoch) alone, so a resumed run reads the same one. `describe` says how many samples of each source an
    epoch draws.
    """

    def __init__(self, sizes: list[int], probs: list[float] | None, seed: int, *, batch_size: int):
        self.sizes, self.seed, self.batch_size = list(sizes), seed, batch_size
        probs = [1.0] * len(sizes) if probs is None else list(probs)
        self.probs = [p / sum(probs) for p in probs]
        self.offsets = np.cumsum([0] + self.sizes)
        self.held = sum(n for n, p in zip(self.sizes, self.probs) if p > 0) if len(sizes) > 1 else sizes[0]
        self.length = self.held // batch_size * batch_size
        self.draws = _largest_remainder([p * self.length for p in self.probs]) if len(sizes) > 1 else [self.length]
        self._cached: tuple[int, torch.Tensor] | None = None

    def __call__(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._order(epoch))
        return self._cached[1]

    def _order(self, epoch: int) -> torch.Tensor:
        if len(self.sizes) == 1:
            return self._stream(0, epoch * self.sizes[0], self.length)
        labels = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.draws))
        labels = labels[torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))]
        order = torch.empty(self.length, dtype=torch.long)
        for k, draws in enumerate(self.draws):
            if draws:
                order[labels == k] = int(self.offsets[k]) + self._stream(k, epoch * draws, draws)
        return order

    def _stream(self, source: int, start: int, count: int) -> torch.Tensor:
        """Items [start, start + count) of source's endless stream of passes, pass p a permutation seeded by
        seed + p (+ a per-source offset): with one source, pass p is exactly epoch p's permutation."""
        size = self.sizes[source]
        position = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for p in range(start // size, (start + count - 1) // size + 1):
            g = torch.Generator().manual_seed(self.seed + p + 1_000_003 * source)
            here = position // size == p
            out[here] = torch.randperm(size, generator=g)[position[here] % size]
        return out

    def describe(self, names: list[str]) -> list[str]:
        return [f"{name}: {size} samples, {draws} per epoch ({draws / size:.2f} passes, weight {p:.3g})"
                for name, size, draws, p in zip(names, self.sizes, self.draws, self.probs)]


def _largest_remainder(shares: list[float]) -> list[int]:
    """Integers summing to round(sum(shares)), each the floor or ceiling of its share."""
    floors = [int(s) for s in shares]
    left = round(sum(shares)) - sum(floors)
    for i in sorted(range(len(shares)), key=lambda i: floors[i] - shares[i])[:left]:
        floors[i] += 1
    return floors


def pack(samples: list[Sample], max_len: int) -> list[list[Sample]]:
    """First-fit-decreasing into rows of at most max_len tokens."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda s: -len(s.input_ids)):
        n = len(sample.input_ids)
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(sample)
                room[r] -= n
                break
        else:
            rows.append([sample])
            room.append(max_len - n)
    return rows


@dataclass
class MicroBatch:
    """One forward's worth of rows. Built on the host; `to(device)` moves it whole.

    `target_rows` (flat indices of the positions that have a trainable target) and `target_ids` (those targets) are
    computed on the host when the batch is built, so selecting the trained rows on the device is an `index_select`,
    never a boolean mask (a `nonzero`, which stalls the GPU stream)."""
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens
    targets: torch.Tensor  # [B, T], IGNORE_INDEX where nothing is trained
    segment_ids: torch.Tensor | None = None  # [B, T] when packed: which sample of the row, -1 on padding
    position_ids: torch.Tensor | None = None  # [B, T] when packed: restarting at 0 for each sample
    target_rows: torch.Tensor | None = None  # [N] flat positions with a target; computed from targets if None
    target_ids: torch.Tensor | None = None  # [N] the targets there
    real_tokens: int = -1  # tokens that are not padding; counted from attention_mask if -1
    # (source, row) of each sample that has targets, in layout order: a teacher cache's key for its target rows
    sample_keys: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.target_rows is None:
            flat = self.targets.flatten()
            self.target_rows = (flat != IGNORE_INDEX).nonzero()[:, 0]
            self.target_ids = flat[self.target_rows]
        if self.real_tokens < 0:
            self.real_tokens = int(self.attention_mask.sum())

    @property
    def trainable_tokens(self) -> int:
        return self.target_rows.numel()

    def to(self, device: torch.device) -> "MicroBatch":
        """On CUDA the copies are asynchronous (pinned host memory), so a step's batches can all be queued at once
        and the host never waits for them."""
        def move(t):
            if not isinstance(t, torch.Tensor) or t.device == device:
                return t
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

        return MicroBatch(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def model_inputs(self, attn_implementation: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Keyword arguments for the HF base model. Packed rows must not see each other:
        - sdpa and eager get a block-diagonal causal mask (boolean for sdpa, additive for eager), because they do not
          isolate samples on position_ids alone when a mask is given; padding positions attend to themselves only,
          so no softmax row is empty;
        - flash attention and flex attention get no mask, only position_ids restarting at 0 for each sample: HF
          reads the sample boundaries off them (the varlen path), as it expects."""
        if self.segment_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if attn_implementation not in ("sdpa", "eager"):
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        seg = self.segment_ids
        width = seg.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] >= 0)
        allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
        mask = allowed[:, None]
        if attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, torch.finfo(dtype).min)
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": self.position_ids}


def collate(samples: list[Sample], pad_id: int) -> MicroBatch:
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(s.targets)
    return MicroBatch(ids, mask, targets, sample_keys=[(s.source, s.row) for s in samples if s.trainable_tokens])


def collate_packed(samples: list[Sample], max_len: int, pad_id: int) -> MicroBatch:
    """The micro-batch's samples packed into as few rows of at most max_len as first-fit-decreasing finds."""
    rows = pack(samples, max_len)
    batch = collate([Sample(sum((s.input_ids for s in row), []), sum((s.targets for s in row), []))
                     for row in rows], pad_id)
    batch.sample_keys = [(s.source, s.row) for row in rows for s in row if s.trainable_tokens]
    batch.segment_ids = torch.full_like(batch.input_ids, -1)
    batch.position_ids = torch.zeros_like(batch.input_ids)
    for r, row in enumerate(rows):
        offset = 0
        for k, s in enumerate(row):
            n = len(s.input_ids)
            batch.segment_ids[r, offset:offset + n] = k
            batch.position_ids[r, offset:offset + n] = torch.arange(n)
            offset += n
    return batch


def padding_efficiency(batches: list[MicroBatch]) -> float:
    """Real tokens over all token slots the forward passes compute."""
    real = sum(b.real_tokens for b in batches)
    return real / max(1, sum(b.input_ids.numel() for b in batches))


def masked_copy(sample: Sample) -> Sample:
    """A stand-in that trains nothing: it keeps a rank's collectives in step when it has run out of real data."""
    return Sample(sample.input_ids, [IGNORE_INDEX] * len(sample.targets))


class StepSampler:
    """Which samples each rank trains on at each step: deterministic, seeded by epoch, disjoint across ranks.

    A global batch is `train_batch_size` consecutive indices of the epoch's order. Rank r takes the r-th
    contiguous slice of it and cuts that into micro-batches, so 1 rank × 2 accumulation steps and 2 ranks × 1 see
    the same samples. The order holds whole global batches only (`EpochOrder`), so every rank takes the same steps.
    """

    def __init__(self, order: EpochOrder, cfg: TrainConfig, rank: int, world_size: int, accumulation: int):
        if order.batch_size != cfg.train_batch_size:
            raise ValueError(f"the epoch order is cut into batches of {order.batch_size}, the steps take "
                             f"train_batch_size {cfg.train_batch_size}")
        self.order, self.cfg, self.rank, self.world, self.accumulation = order, cfg, rank, world_size, accumulation
        self.steps_per_epoch = order.length // cfg.train_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"dataset: {order.held} usable samples is fewer than train_batch_size "
                            f"{cfg.train_batch_size}; lower train_batch_size or add data")

    def indices(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        per_rank = self.cfg.micro_train_batch_size * self.accumulation
        start = step_in_epoch * self.cfg.train_batch_size + self.rank * per_rank
        mine = self.order(epoch)[start:start + per_rank].tolist()
        mbs = self.cfg.micro_train_batch_size
        return [mine[i:i + mbs] for i in range(0, per_rank, mbs)]


def eval_shards(samples: list[Sample], micro_batch_size: int, rank: int, world_size: int) -> list[list[Sample]]:
    """Round-robin shard; short ranks are topped up with masked copies so all ranks run the same forwards."""
    mine = samples[rank::world_size]
    per_rank = -(-len(samples) // world_size)
    mine = mine + [masked_copy(samples[0])] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
