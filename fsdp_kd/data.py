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

from .cross_tokenizer import LEFT_OUT, UNALIGNED_SAMPLE, in_spans, span_taught
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


class RoutedTo:
    """A table whose samples are routed to several teachers (`routing`): sample i to the teacher of index
    `teachers[i]`."""

    def __init__(self, table: SampleTable, teachers: np.ndarray):
        self.table, self.teachers, self.lengths = table, teachers, table.lengths

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Sample:
        return dataclasses.replace(self.table[i], teacher=int(self.teachers[i]))


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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host data on the device without the host waiting: on CUDA the copy runs from pinned memory, asynchronously,
    so a step's inputs can all be queued at once (a copy from pageable memory would stall until it is done)."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def host_values(values: list[float], device: torch.device) -> torch.Tensor:
    """Numbers the host knows, as a float64 tensor on the device, copied without stalling it (`to_device`)."""
    return to_device(torch.tensor(values, dtype=torch.float64), device)


# The attention implementations a run may use, each keeping packed samples apart (`MicroBatch.model_inputs`): sdpa
# and eager get a block-diagonal mask; the others get restarting position_ids and no mask (HF's varlen path).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class MicroBatch:
    """One forward's worth of rows. Built on the host; `to(device)` moves it whole.

    Everything that depends on the values of the layout is computed here on the host, so the forward never reads a
    device tensor back (a host sync, which stalls the GPU stream): `target_rows` (flat indices of the positions that
    have a trainable target) and `target_ids` (those targets), so selecting the trained rows is an `index_select`
    and never a boolean mask; whether there is padding; and the varlen layout flash attention reads."""
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens (right-padded)
    targets: torch.Tensor  # [B, T], IGNORE_INDEX where nothing is trained
    segment_ids: torch.Tensor | None = None  # [B, T] when packed: which sample of the row, -1 on padding
    position_ids: torch.Tensor | None = None  # [B, T] when packed: restarting at 0 for each sample
    target_rows: torch.Tensor | None = None  # [N] flat positions with a target; computed from targets if None
    target_ids: torch.Tensor | None = None  # [N] the targets there
    real_tokens: int = -1  # tokens that are not padding; counted from attention_mask if -1
    # (source, row) of each sample that has targets, in layout order: a teacher cache's key for its target rows
    sample_keys: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    # the rows flattened into one sequence: where each sample, and each row's padding, starts (int32, [S + 1]),
    # and the longest of them; computed from the layout if None
    cu_seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0
    # a teacher with its own tokenizer: the same samples in its tokens, laid out in the same rows, whose target_rows
    # are, for each of this batch's target rows in order, the teacher position predicting the same token (flat
    # position 0 where there is none: a valid index, whose row the loss masks), and `aligned` [N] (1.0 where there is
    # one, else 0.0: the CE term alone there)
    teacher: MicroBatch | None = None
    aligned: torch.Tensor | None = None
    # ... and its groups of several tokens on a side, whose teacher rows follow those N in teacher.target_rows
    spans: Spans | None = None
    # ... and how many trained tokens have no teacher term at all, by why (host counts, ordered as
    # `cross_tokenizer.LEFT_OUT`)
    left_out: tuple[int, ...] = (0,) * len(LEFT_OUT)
    # several teachers (`routing`): per teacher index, its samples of this batch alone (`Route`)
    routes: list[Route] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.target_rows is None:
            flat = self.targets.flatten()
            self.target_rows = (flat != IGNORE_INDEX).nonzero()[:, 0]
            self.target_ids = flat[self.target_rows]
        if self.real_tokens < 0:
            self.real_tokens = int(self.attention_mask.sum())
        if self.cu_seq_lens is None:
            self.cu_seq_lens, self.max_seq_len = _varlen_layout(self._segments())

    @property
    def trainable_tokens(self) -> int:
        return self.target_rows.numel()

    @property
    def padded(self) -> bool:
        return self.real_tokens < self.input_ids.numel()

    def to(self, device: torch.device) -> "MicroBatch":
        def moved(v):
            if isinstance(v, torch.Tensor):
                return to_device(v, device)
            if isinstance(v, list) and v and isinstance(v[0], Route):
                return [Route(r.batch.to(device), to_device(r.rows, device), r.count) for r in v]
            return v.to(device) if isinstance(v, (MicroBatch, Spans)) else v

        return MicroBatch(*(moved(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def _segments(self) -> torch.Tensor:
        """[B, T]: which sample of its row each position belongs to, -1 on padding (one sample per row unpacked)."""
        return self.segment_ids if self.segment_ids is not None else self.attention_mask - 1

    def model_inputs(self, attn_implementation: str, dtype: torch.dtype, sliding_window: bool = False) -> dict:
        """Keyword arguments for the HF base model: samples packed into a row must not see each other, and HF's own
        mask code must not read a device tensor (each read stalls the GPU stream, once per forward). HF takes a 4-D
        mask as it is; given a 2-D mask it reads whether there is padding (`.all()`), given none it reads the
        position ids to find packed samples. So:
        - sdpa and eager: a 4-D block-diagonal causal mask (boolean for sdpa, additive for eager) from the layout;
          padding positions attend to themselves only, so no softmax row is empty. One exception, deliberate: a
          batch with neither padding nor packing gets no mask under sdpa, which then runs its flash kernel with
          is_causal (with any mask it must compute the masked half of every row too); HF reads the position ids
          once per forward to learn that.
        - flash attention: no mask; positions restarting at 0 for each sample, and the varlen layout
          (`cu_seq_lens`, `max_seq_len`) so the kernel reads the sample boundaries from the host's numbers instead
          of deriving them from the positions in every layer. HF's mask code still reads the positions once per
          forward: flash attention takes no 4-D mask that would skip that.
        - flex attention: no mask, positions restarting at 0 for each sample when packed (HF builds the block mask
          from them, reading them once per forward). Unpacked rows need no mask: their padding is at the end, where
          causal attention keeps it out of every real position's view.
        - a model with sliding-window layers (`sliding_window`, see `uses_sliding_window`): HF takes a 4-D mask as
          it is, window included or not, so one mask cannot serve its full and its windowed layers. It gets HF's own
          path instead: a 2-D padding mask, or for packed rows only the restarting positions (the block-causal and
          windowed masks are then built by HF, which reads the device once per forward). Correct first; the read
          is the price."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if sliding_window and not attn_implementation.startswith("flash_attention"):
            if self.padded and self.segment_ids is None:
                return {**inputs, "attention_mask": self.attention_mask}
            return inputs
        if attn_implementation.startswith("flash_attention"):
            return {**inputs, "cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                    "max_length_q": self.max_seq_len, "max_length_k": self.max_seq_len}
        if attn_implementation == "eager" or (attn_implementation == "sdpa" and (
                self.padded or self.segment_ids is not None)):
            return {**inputs, "attention_mask": self._block_causal_mask(attn_implementation, dtype)}
        return inputs

    def _block_causal_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, T, T]: position i attends to j ≤ i of its own sample; padding to itself. Computed on the device."""
        seg = self._segments()
        width = seg.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] >= 0)
        allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
        mask = allowed[:, None]
        if attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask


@dataclass
class SpanBlock:
    """The groups of one token block of the loss: the block's rows that hold a group's tokens (`rows`, local) with
    each one's group and place in it, the teacher's span rows of those groups (`teacher`, a range of the span rows)
    with theirs, and each side's longest group."""
    groups: int
    rows: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    teacher: slice
    teacher_group: torch.Tensor
    teacher_slot: torch.Tensor
    width: int
    teacher_width: int


@dataclass
class Spans:
    """A micro-batch's groups of several tokens on a side (`Sample.teacher_spans`) that the span term teaches,
    numbered in the order of the student's target rows: each group's student rows (consecutive target rows) and its
    teacher rows (consecutive, after the N rows aligned with the student's in `MicroBatch.teacher.target_rows`), each
    row's group and its place in it. Where each group starts stays on the host, so that the loss cuts its token
    blocks between groups (`row_blocks`) and finds a block's groups (`block`) without reading the device."""
    rows: torch.Tensor  # [R] the student's target rows in groups
    group: torch.Tensor  # [R]
    slot: torch.Tensor  # [R] its place in its group
    teacher_group: torch.Tensor  # [M]
    teacher_slot: torch.Tensor  # [M]
    first_row: np.ndarray  # [G] each group's first target row
    offsets: np.ndarray  # [G + 1] where each group's rows start in `rows`
    teacher_offsets: np.ndarray  # [G + 1] ... and in the teacher's span rows

    @classmethod
    def of(cls, first_row, counts, teacher_counts) -> Spans:
        """From each group's first target row and its token counts on each side."""
        first_row, counts, teacher_counts = (np.asarray(x, dtype=np.int64) for x in (first_row, counts,
                                                                                     teacher_counts))
        offsets, teacher_offsets = (np.concatenate([[0], np.cumsum(c)]) for c in (counts, teacher_counts))
        group, teacher_group = (np.repeat(np.arange(len(c)), c) for c in (counts, teacher_counts))
        slot = np.arange(offsets[-1]) - offsets[group]
        as_tensor = torch.from_numpy
        return cls(as_tensor(first_row[group] + slot), as_tensor(group), as_tensor(slot), as_tensor(teacher_group),
                   as_tensor(np.arange(teacher_offsets[-1]) - teacher_offsets[teacher_group]), first_row, offsets,
                   teacher_offsets)

    @property
    def teacher_rows(self) -> int:
        return int(self.teacher_offsets[-1])

    def to(self, device: torch.device) -> Spans:
        return dataclasses.replace(self, **{f.name: to_device(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self) if f.type == "torch.Tensor"})

    def row_blocks(self, n: int, block_rows: int) -> list[slice]:
        """Token blocks of about `block_rows` rows over n rows, each cut between two groups: a cut that would fall
        inside a group moves to its end."""
        blocks, r0 = [], 0
        while r0 < n:
            r1 = min(r0 + block_rows, n)
            g = int(np.searchsorted(self.first_row, r1)) - 1  # the last group that starts before r1
            if g >= 0:
                r1 = max(r1, int(self.first_row[g] + self.offsets[g + 1] - self.offsets[g]))
            blocks.append(slice(r0, r1))
            r0 = r1
        return blocks

    def block(self, rows: slice) -> SpanBlock | None:
        """The groups of token block `rows` (cut by `row_blocks`), or None when it holds none."""
        g0, g1 = (int(np.searchsorted(self.first_row, r)) for r in (rows.start, rows.stop))
        if g0 == g1:
            return None
        k0, k1, m0, m1 = self.offsets[g0], self.offsets[g1], self.teacher_offsets[g0], self.teacher_offsets[g1]
        return SpanBlock(g1 - g0, self.rows[k0:k1] - rows.start, self.group[k0:k1] - g0, self.slot[k0:k1],
                         slice(int(m0), int(m1)), self.teacher_group[m0:m1] - g0, self.teacher_slot[m0:m1],
                         int(np.diff(self.offsets[g0:g1 + 1]).max()),
                         int(np.diff(self.teacher_offsets[g0:g1 + 1]).max()))


@dataclass
class Route:
    """The samples of a micro-batch routed to one teacher: `batch` holds them alone, in the micro-batch's own layout
    order, so its target rows are, in order, the micro-batch's target rows at `rows`; `count` is their number, known
    on the host. A teacher with no sample here gets a masked stand-in batch and no rows (`count` 0): a teacher whose
    forward is collective over the ranks runs on it, so every rank calls it alike."""
    batch: MicroBatch
    rows: torch.Tensor | None  # [count] long; None: every target row of the batch
    count: int


def uses_sliding_window(config) -> bool:
    """Whether any layer of the model attends over a sliding window (Mistral, Gemma-2/3, Qwen2 with
    use_sliding_window): transformers lists layer types where it has them, else a set `sliding_window` means all."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    windowed = getattr(config, "sliding_window", None) is not None
    return windowed and getattr(config, "use_sliding_window", True) is not False


def _varlen_layout(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens, longest) of the rows flattened into one sequence: each run of a sample, or of a row's padding,
    is one sequence of its own. Host work, at collate time."""
    rows, width = segments.shape
    key = (segments + 1 + torch.arange(rows)[:, None] * (width + 1)).flatten().numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [key.size]])
    return torch.from_numpy(starts.astype(np.int32)), int(np.diff(starts).max())


def collate(samples: list[Sample], pad_id: int, teachers: Sequence[bool] = ()) -> MicroBatch:
    """One sample per row, right-padded; with `teachers` (several, `routing`: whether each reads its own tokens),
    each one's `Route` too."""
    return _collate_rows([[s] for s in samples], pad_id, packed=False, teachers=teachers)


def collate_packed(samples: list[Sample], max_len: int, pad_id: int, teachers: Sequence[bool] = ()) -> MicroBatch:
    """The micro-batch's samples packed into as few rows of at most max_len as first-fit-decreasing finds."""
    return _collate_rows(pack(samples, max_len), pad_id, packed=True, teachers=teachers)


NO_TEACHER_TOKENS = {"teacher_ids": None, "teacher_positions": None, "teacher_spans": None}


def _routes(rows: list[list[Sample]], pad_id: int, packed: bool, teachers: Sequence[bool]) -> list[Route]:
    """Per teacher index, its samples laid out in the same rows and order (`Route`), from each sample's `teacher`;
    a teacher that reads its own tokens (`teachers[t]`) gets them laid out (`MicroBatch.teacher`), another none (a
    sample routed per record holds empty ones of a teacher that reads the student's). A teacher with no sample here
    gets a masked stand-in, with no teacher tokens at all where it reads its own (one padding slot: `_teacher_rows`)."""
    owner = np.repeat([s.teacher for row in rows for s in row], [s.trainable_tokens for row in rows for s in row])
    routes = []
    for t, own in enumerate(teachers):
        mine = [[s if own else dataclasses.replace(s, **NO_TEACHER_TOKENS) for s in row if s.teacher == t]
                for row in rows]
        mine = [row for row in mine if row]
        rows_at = torch.from_numpy(np.flatnonzero(owner == t).astype(np.int64))
        if not rows_at.numel():
            stand_in = masked_copy(rows[0][0])
            tokens = (dict(teacher_ids=[], teacher_positions=[UNALIGNED_SAMPLE] * len(stand_in.input_ids),
                           teacher_spans=[]) if own else NO_TEACHER_TOKENS)
            mine = [[dataclasses.replace(stand_in, **tokens)]]
        routes.append(Route(_collate_rows(mine, pad_id, packed), rows_at, rows_at.numel()))
    return routes


def _collate_rows(rows: list[list[Sample]], pad_id: int, packed: bool, teachers: Sequence[bool] = ()) -> MicroBatch:
    """Each row's samples one after the other, then padding; segments and restarting positions when packed. The
    teacher's tokens are laid out where every sample has them and the batch is not routed; routed, in each route of
    a teacher that reads its own, and the batch's `left_out` counts are the routes' together."""
    ids, mask, segments, positions, _ = _row_layout([[s.input_ids for s in row] for row in rows], pad_id)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[mask.bool()] = torch.tensor([t for row in rows for s in row for t in s.targets], dtype=torch.long)
    keys = [(s.source, s.row) for row in rows for s in row if s.trainable_tokens]
    layout = dict(segment_ids=segments if packed else None, position_ids=positions if packed else None,
                  sample_keys=keys)
    if teachers:
        routes = _routes(rows, pad_id, packed, teachers)
        left_out = tuple(map(sum, zip(*(route.batch.left_out for route in routes))))
        return MicroBatch(ids, mask, targets, **layout, left_out=left_out, routes=routes)
    if any(s.teacher_ids is None for row in rows for s in row):
        return MicroBatch(ids, mask, targets, **layout)
    teacher, aligned, spans, left_out = _teacher_rows(rows, packed)
    return MicroBatch(ids, mask, targets, **layout, teacher=teacher, aligned=aligned, spans=spans, left_out=left_out)


def _row_layout(rows: list[list[list[int]]], pad_id: int):
    """(ids, mask, segments, positions) [B, T] of token lists laid one after another in each row, then padding
    (`pad_id`, masked out; segment -1), and where each list starts in its row."""
    width = max(1, max(sum(map(len, row)) for row in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    starts = []
    for r, row in enumerate(rows):
        offset, row_starts = 0, []
        for k, tokens in enumerate(row):
            n = len(tokens)
            ids[r, offset:offset + n] = torch.tensor(tokens, dtype=torch.long)
            mask[r, offset:offset + n] = 1
            segments[r, offset:offset + n] = k
            positions[r, offset:offset + n] = torch.arange(n)
            row_starts.append(offset)
            offset += n
        starts.append(row_starts)
    return ids, mask, segments, positions, starts


def _teacher_rows(rows: list[list[Sample]], packed: bool) -> tuple[MicroBatch, torch.Tensor, Spans, tuple[int, ...]]:
    """The teacher's tokens of the same samples in the same rows (`MicroBatch.teacher`), `aligned`, the groups of
    several tokens (`Spans`), and the trained tokens with no teacher term by why (`cross_tokenizer.LEFT_OUT`, in its
    order: host counts). Its first N target rows follow the student's: row by row, sample by sample, position by
    position, as `MicroBatch` orders them; then come the positions predicting each taught group's teacher tokens,
    group by group. A group is taught when all its student positions are trained (`span_taught`). Padding is id 0:
    any valid id, masked and never read."""
    ids, mask, segments, positions, starts = _row_layout([[s.teacher_ids for s in row] for row in rows], 0)
    width = ids.shape[1]
    flat, labels, aligned, flat_reasons = [], [], [], []
    span_flat, span_labels, first_row, counts, teacher_counts = [], [], [], [], []
    trained_before = 0
    for r, row in enumerate(rows):
        for s, offset in zip(row, starts[r]):
            teacher_ids = np.asarray(s.teacher_ids, dtype=np.int64)
            trained = np.asarray(s.targets) != IGNORE_INDEX
            at = np.asarray(s.teacher_positions, dtype=np.int64)[trained]
            has = at >= 0
            flat.append(np.where(has, r * width + offset + at, 0))
            labels.append(np.where(has, teacher_ids[np.where(has, at + 1, 0)] if len(teacher_ids) else 0, 0))
            aligned.append(has)
            target_row = trained_before + np.cumsum(trained) - 1  # each trained position's target row
            spans = span_taught(s.teacher_spans, trained)
            for s0, s1, t0, t1 in spans:
                first_row.append(target_row[s0])
                counts.append(s1 - s0)
                teacher_counts.append(t1 - t0)
                span_flat.append(r * width + offset + np.arange(t0, t1))
                span_labels.append(teacher_ids[t0 + 1:t1 + 1])
            flat_reasons.append(at[~has & ~in_spans(spans, len(trained))[trained]])
            trained_before += int(trained.sum())
    rows_at, label_ids, where = (torch.from_numpy(np.concatenate(a)) for a in (flat + span_flat,
                                                                               labels + span_labels, aligned))
    if not mask.any():
        mask[:, 0] = 1  # no sample has teacher tokens: one real slot, so the forward has a token to attend to
    teacher = MicroBatch(ids, mask, torch.full_like(ids, IGNORE_INDEX), segments if packed else None,
                         positions if packed else None, target_rows=rows_at.long(), target_ids=label_ids.long())
    reasons = np.concatenate(flat_reasons)
    return (teacher, where.float(), Spans.of(first_row, counts, teacher_counts),
            tuple(int((reasons == code).sum()) for code in LEFT_OUT))


def padding_efficiency(batches: list[MicroBatch]) -> float:
    """Real tokens over all token slots the forward passes compute."""
    real = sum(b.real_tokens for b in batches)
    return real / max(1, sum(b.input_ids.numel() for b in batches))


def masked_copy(sample: Sample) -> Sample:
    """A stand-in that trains nothing: it keeps a rank's collectives in step when it has run out of real data."""
    return dataclasses.replace(sample, targets=[IGNORE_INDEX] * len(sample.targets), source="", row=-1)


class StepSampler:
    """Which samples each rank trains on at each step: deterministic, seeded by epoch, disjoint across ranks.

    A global batch is `train_batch_size` consecutive indices of the epoch's order. Rank r takes the r-th
    contiguous slice of it and cuts that into micro-batches, so 1 rank × 2 accumulation steps and 2 ranks × 1 see
    the same samples. The order holds whole global batches only (`EpochOrder`), so every rank takes the same steps.
    """

    def __init__(self, order: EpochOrder, micro_batch_size: int, rank: int, world_size: int, accumulation: int):
        if order.batch_size != micro_batch_size * accumulation * world_size:
            raise ValueError(f"the epoch order is cut into batches of {order.batch_size}, the steps take "
                             f"{micro_batch_size} × {accumulation} accumulation × {world_size} ranks")
        self.order, self.micro_batch_size, self.rank, self.accumulation = order, micro_batch_size, rank, accumulation
        self.steps_per_epoch = order.length // order.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"dataset: {order.held} usable samples is fewer than train_batch_size "
                            f"{order.batch_size}; lower train_batch_size or add data")

    def indices(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        per_rank = self.micro_batch_size * self.accumulation
        start = step_in_epoch * self.order.batch_size + self.rank * per_rank
        mine = self.order(epoch)[start:start + per_rank].tolist()
        mbs = self.micro_batch_size
        return [mine[i:i + mbs] for i in range(0, per_rank, mbs)]


def eval_shards(samples: list[Sample], micro_batch_size: int, rank: int, world_size: int) -> list[list[Sample]]:
    """Round-robin shard; short ranks are topped up with masked copies so all ranks run the same forwards."""
    mine = samples[rank::world_size]
    per_rank = -(-len(samples) // world_size)
    mine = mine + [masked_copy(samples[0])] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
