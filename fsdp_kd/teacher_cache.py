"""Teacher distributions on disk: what `python -m fsdp_kd.cache_teacher` writes and `train.py --teacher_cache` reads.

For every trained token the cache keeps a compact stand-in for the teacher's distribution p at the temperature τ, in
one of the modes of `CACHE_MODES`:
  topk     the k most likely ids, their log-probabilities, and the log of the mass on every other token (the
           "rest" bucket); training takes the divergence between the bucketed distributions, exact at k = V;
  sampled  n draws from p, stored as the distinct ids with their counts; p̂ = counts / n is an unbiased estimate
           of p, so forward KL's gradient q - p̂ is an unbiased estimate of the live one;
  hidden   the teacher's final hidden state itself (bf16 by default, 2·H bytes), and the teacher's output head once
           for the whole cache: training rebuilds the teacher's exact logits from them (`targets.LiveTargets`), so
           every divergence trains as with the live teacher, with no teacher body loaded.
A mode is one `CacheMode` entry, which says all there is to it: how its rows are built from the teacher's logits, the
columns a part stores, the targets the loss takes from them, its metric names and the divergences it can train.

Layout of a cache directory:
  cache.json                what the cache is valid for (tokenizer, the data's sample hashes and settings, teacher,
                            τ, mode, k or n, vocabulary), and whether it is complete
  part-CCCCCC-rRRR-of-WWW.safetensors
                            chunk C of the samples as built by rank R of W: `sample` (the cache's sample index),
                            `offsets` (each sample's token rows), and the mode's columns: `ids` (uint8 [tokens,
                            slots, bytes]: the fewest little-endian bytes that hold the vocabulary) with `log_p` +
                            `log_rest` (topk, 16-bit by default) or `counts` (sampled, uint8); or `hidden` (hidden)
  head.safetensors          hidden mode: the teacher's output head (`weight`, and `bias` if it has one), whose logit
                            scale and soft-cap cache.json records
A part is written to a temporary name and renamed, so a killed build keeps its finished parts and loses no more
than the parts in flight.
"""

from __future__ import annotations

import functools
import json
import math
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .buckets import ID_MASKS, id_places, mass_on_buckets, top_tokens
from .cross_tokenizer import ALIGNMENT_VERSION
from .cross_vocab import ALIGNED_METRIC_NAMES
from .data import to_device
from .divergences import DIVERGENCES, effective_divergence
from .errors import ConfigError
from .kernel import Head, ModelBlock, pass1_logits, vocab_chunks
from .loss import LossSpec, choose_chunks
from .preemption import no_signal
from .targets import LiveTargets, SparseTargets, Targets

META_FILE = "cache.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1
LOG_P_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HIDDEN_DTYPES = ("bfloat16", "float32")  # of LOG_P_DTYPES, those a hidden cache takes: float16 has not bf16's range
OPEN_PARTS = 128  # parts a reader keeps open, each one memory map: far below vm.max_map_count (65530)


# ------------------------------------------------------------------------------------------------ the teacher side
def teacher_topk(teacher: ModelBlock, chunks, k: int, inv_tau: float) -> SparseTargets:
    """The k most likely tokens of each row of a teacher block, their tempered log-probabilities, and the log of the
    mass on all other tokens (exact: a masked log-sum-exp, not log(1 - Σ), so it is -inf at k = V)."""
    rows = teacher.hidden.shape[0]
    pass1_logits(teacher, chunks, torch.zeros(rows, dtype=torch.long, device=teacher.hidden.device), inv_tau)
    top, best_ids = top_tokens(teacher, chunks, k)
    (p,), _ = mass_on_buckets((teacher,), id_places(best_ids, chunks), inv_tau, known_at=(top,))
    return SparseTargets(best_ids, p.log_at, p.log_rest)


def teacher_samples(teacher: ModelBlock, chunks, n: int, inv_tau: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, counts) [rows, n]: n draws per row from the tempered teacher distribution, the distinct ids each with
    its count in the slot of its first occurrence (the other slots repeat the id with count 0).

    Drawn in two stages that never build a [rows × vocabulary] probability tensor: which chunk each draw falls in
    (by the chunks' masses), then n draws within every chunk, of which each row keeps as many as fell there."""
    rows, device = teacher.hidden.shape[0], teacher.hidden.device
    pass1_logits(teacher, chunks, torch.zeros(rows, dtype=torch.long, device=device), inv_tau)
    chunk_lse = torch.stack([torch.logsumexp(z * inv_tau, dim=1) for z in teacher.logits], 1)
    chunk_of_draw = torch.multinomial((chunk_lse - teacher.lse[:, None]).exp(), n, replacement=True,
                                      generator=generator)
    drawn, kept = [], []
    for c, (z, (v0, _)) in enumerate(zip(teacher.logits, chunks)):
        here = (chunk_of_draw == c).sum(1, keepdim=True)
        probs = torch.softmax(z * inv_tau, dim=1)
        drawn.append(torch.multinomial(probs, n, replacement=True, generator=generator) + v0)
        kept.append(torch.arange(n, device=device)[None, :] < here)
    drawn, kept = torch.cat(drawn, 1), torch.cat(kept, 1)
    first = torch.sort(kept.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n]
    ids = drawn.gather(1, first).sort(dim=1).values
    return ids, run_counts(ids)


def run_counts(sorted_ids: torch.Tensor) -> torch.Tensor:
    """For rows of sorted ids: each run's length at its first position, 0 elsewhere."""
    rows, n = sorted_ids.shape
    position = torch.arange(n, device=sorted_ids.device).expand(rows, n)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    start_at = torch.where(starts, position, n)
    following = torch.cat([start_at[:, 1:], torch.full((rows, 1), n, device=sorted_ids.device)], 1)
    next_start = following.flip(1).cummin(1).values.flip(1)
    return torch.where(starts, next_start - position, 0)


def teacher_rows(hidden: torch.Tensor, head: Head, spec: LossSpec, vocab_size: int, mode: str, slots: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """The cached form of the teacher's distribution at each row of `hidden` (its final hidden states at the target
    rows): the columns of `mode` (`CACHE_MODES`). Walks token blocks and vocabulary chunks as the loss does
    (`choose_chunks`), so no [tokens × vocabulary] tensor exists."""
    build = CACHE_MODES[mode].build_rows
    rows, cols = choose_chunks(spec, hidden.device, hidden.shape[0], vocab_size, 1 + ID_MASKS)  # top-k: masks
    chunks = vocab_chunks(vocab_size, cols)
    weight = head.weight.to(hidden.dtype)
    parts = []
    for r0 in range(0, hidden.shape[0], rows):
        block = ModelBlock(head, weight, head.bias, hidden[r0:r0 + rows])
        parts.append(build(block, chunks, slots, 1.0 / spec.temperature, generator))
    return tuple(torch.cat(column) for column in zip(*parts))


# ------------------------------------------------------------------------------------------------ storage
def id_bytes(vocab_size: int) -> int:
    """The fewest bytes that hold every id below vocab_size."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2)) / 8))


def encode_ids(ids: torch.Tensor, width: int) -> torch.Tensor:
    """Long ids [..., k] → uint8 [..., k, width], little-endian."""
    shifts = torch.arange(width, device=ids.device) * 8
    return ((ids[..., None] >> shifts) & 0xFF).to(torch.uint8)


def decode_ids(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(packed.shape[-1], device=packed.device) * 8
    return (packed.long() << shifts).sum(-1)


def teacher_identity(teacher_model: str) -> str:
    """How a cache records its teacher: a local directory (the same test as `loading.local_model_path`) by its
    absolute path, a hub id as the id, so that a build resumed, or a run started, from another directory names the
    same teacher the same way."""
    local = os.path.expanduser(teacher_model)
    return os.path.abspath(local) if os.path.isdir(local) else teacher_model


def part_name(chunk: int, rank: int, world: int) -> str:
    return f"part-{chunk:06d}-r{rank:03d}-of-{world:03d}.safetensors"


def is_part(name: str) -> bool:
    """Whether a file of a cache directory holds rows (not the head a hidden-state cache keeps beside them)."""
    return name.startswith("part-") and name.endswith(".safetensors")


@dataclass
class CacheMeta:
    """What a cache holds and what it is valid for (cache.json)."""
    mode: str
    slots: int  # per token: the mode's k (topk) or n (sampled)
    temperature: float
    vocab_size: int
    log_p_dtype: str
    tokenizer: str  # tokenized.tokenizer_fingerprint
    sources: list[dict]  # [{"path", "samples_sha256", "samples", "offset"}]: the cache's sample index space
    settings: dict  # the tokenization settings (tokenized.TOKEN_SETTINGS)
    teacher: str  # teacher_identity(teacher_model)
    samples_per_chunk: int
    teacher_tokenizer: str | None = None  # a teacher of its own tokenizer (cross_tokenizer): its fingerprint
    alignment: int | None = None  # ... and the cross_tokenizer.ALIGNMENT_VERSION its rows were placed with
    teacher_context: list | None = None  # privileged context the teacher read (`PrivilegedTokenization.rendering`)
    teacher_vocab_size: int | None = None  # ... and its vocabulary's size (a top-k below it is a part of it)
    hidden_dtype: str = "bfloat16"  # hidden mode: the stored hidden states' dtype
    head: dict | None = None  # hidden mode: the head's logit transforms, {"scale", "softcap"}
    complete: bool = False
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    format: int = FORMAT_VERSION

    def save(self, directory: str) -> None:
        tmp = os.path.join(directory, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.__dict__, f, indent=1)
        os.replace(tmp, os.path.join(directory, META_FILE))

    @classmethod
    def load(cls, directory: str) -> "CacheMeta":
        path = os.path.join(directory, META_FILE)
        if not os.path.exists(path):
            raise ConfigError(f"key teacher_cache: {directory} holds no {META_FILE}; build one with "
                              "`torchrun ... -m fsdp_kd.cache_teacher --teacher_cache DIR ...`")
        with open(path) as f:
            meta = cls(**json.load(f))
        if meta.format != FORMAT_VERSION:
            raise ConfigError(f"key teacher_cache: {directory} has cache format {meta.format}, this version reads "
                              f"{FORMAT_VERSION}; rebuild it")
        return meta

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.sources)


# ------------------------------------------------------------------------------------------------ the modes
@dataclass(frozen=True)
class Column:
    """One tensor a cache mode keeps per token row: its shape past the row (one value per slot, or one value) and
    dtype as the mode builds it, how a part stores it (`store`, on the host), and what a column read back becomes on
    the device (`load`)."""
    name: str
    per_slot: bool
    dtype: torch.dtype
    store: Callable[[torch.Tensor, CacheMeta], torch.Tensor]
    load: Callable[[torch.Tensor], torch.Tensor]


def _log_p_column(name: str, per_slot: bool) -> Column:
    """Log-probabilities, stored in the cache's `log_p_dtype` (16-bit by default), read as fp32."""
    return Column(name, per_slot, torch.float32, lambda t, meta: t.to(LOG_P_DTYPES[meta.log_p_dtype]),
                  torch.Tensor.float)


IDS = Column("ids", True, torch.long, lambda t, meta: encode_ids(t, id_bytes(meta.vocab_size)), decode_ids)
COUNTS = Column("counts", True, torch.long, lambda t, meta: t.to(torch.uint8), torch.Tensor.float)  # n <= 255


@dataclass(frozen=True)
class CacheMode:
    """One way of storing the teacher's distribution at a token, whole: what the build stores per token (its
    `columns`, made by `build_rows` from a teacher block's logits at τ), what training sends the loss from them
    (`targets`, any `targets.Targets`), how the loss's metrics read against it (`metric_names`; None drops one), and
    the divergences it can train (refused otherwise, saying what the mode `lacks`). A mode that `keeps_head` stores the
    teacher's output head once beside its rows, and its `targets` get it."""
    name: str
    slots_key: str | None  # the config key of its slots per token (None: set by the teacher)
    slots: Callable[[int | None, int, int], int]  # (that key's value, vocabulary, hidden size) -> slots per token
    build_rows: Callable[[ModelBlock, list[tuple[int, int]], int, float, torch.Generator | None],
                         tuple[torch.Tensor, ...]]  # (block, chunks, slots, 1/τ, generator) -> the columns
    columns: tuple[Column, ...]
    # (the columns loaded on the device, the cache's record, the teacher's head if kept) -> targets
    targets: Callable[[dict[str, torch.Tensor], CacheMeta, Head | None], Targets]
    metric_names: Callable[[CacheMeta], dict[str, str | None]]
    divergences: tuple[str, ...] = tuple(DIVERGENCES)
    lacks: str = ""
    size_name: str = ""  # what its slots are, e.g. "k"
    keeps_head: bool = False
    tempered: bool = True  # its rows hold the teacher at the build's kd_temperature (a hidden state does not)

    def describe(self, slots: int) -> str:
        """Its size per token, e.g. "k = 64"."""
        return f"{self.size_name} = {slots}"


def _topk_rows(block: ModelBlock, chunks, k: int, inv_tau: float, generator) -> tuple[torch.Tensor, ...]:
    top = teacher_topk(block, chunks, k, inv_tau)
    return top.ids, top.log_p, top.log_rest


def _topk_metric_names(meta: CacheMeta) -> dict[str, str | None]:
    """Over buckets. The live teacher_ce is at τ = 1; the cache holds the teacher at kd_temperature only, from which
    τ = 1 cannot be recovered, so a tempered cache's teacher CE says so."""
    tempered = "" if meta.temperature == 1.0 else "_at_kd_temperature"
    if meta.teacher_tokenizer:  # across tokenizers: means over the aligned rows; the KL is the live run's quantity
        # at k = V_t, and a lower bound of it below (the teacher's shared tokens past its top k are merged into the
        # rest bucket: coarser buckets), the teacher's entropy and CE are over the top-k buckets, the top-1 the
        # cache's most likely shared token
        exact = meta.teacher_vocab_size is not None and meta.slots >= meta.teacher_vocab_size
        return {"kl": ALIGNED_METRIC_NAMES["kl"] + ("" if exact else "_lower_bound"),
                "teacher_entropy": "teacher_entropy_buckets_aligned",
                "student_entropy": ALIGNED_METRIC_NAMES["student_entropy"],
                "top1_agreement": "top1_agreement_shared_aligned", "teacher_ce": "teacher_ce_buckets_aligned" + tempered}
    return {"kl": "kl_buckets", "teacher_entropy": "teacher_entropy_buckets", "teacher_ce": "teacher_ce_buckets" + tempered}


def _rows_with_teacher(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows a top-k cache across tokenizers holds a distribution for (the others have no aligned teacher
    token: `cross_vocab.topk_in_student_vocabulary`)."""
    return (columns["log_rest"] > -math.inf) | (columns["log_p"].amax(1) > -math.inf)


def _sampled_targets(columns: dict[str, torch.Tensor], meta: CacheMeta, head: None) -> SparseTargets:
    """p̂ = counts / n (-inf on the empty slots), with no rest: the draws are all the cache knows."""
    ids = columns["ids"]
    log_p = torch.log(columns["counts"] / meta.slots)
    return SparseTargets(ids, log_p, torch.full(ids.shape[:1], -math.inf, device=ids.device))


CACHE_MODES: dict[str, CacheMode] = {
    # the k most likely ids, their log-probabilities and the rest bucket: exact at k = V, biased (the tail's shape
    # is lost) below it
    "topk": CacheMode(
        "topk", "cache_k", slots=lambda k, vocab_size, hidden_size: min(k, vocab_size), build_rows=_topk_rows,
        columns=(IDS, _log_p_column("log_p", per_slot=True), _log_p_column("log_rest", per_slot=False)),
        targets=lambda columns, meta, head: SparseTargets(columns["ids"], columns["log_p"], columns["log_rest"],
                                                    _rows_with_teacher(columns) if meta.teacher_tokenizer else None),
        metric_names=_topk_metric_names,
        divergences=tuple(name for name, d in DIVERGENCES.items() if not d.student_buckets),
        lacks="the teacher's probability at the student's most likely tokens, which a top-k cache has only where "
              "they are among the teacher's k", size_name="k"),
    # n draws as distinct ids with counts: p̂ is unbiased, but 0 off the draws
    "sampled": CacheMode(
        "sampled", "cache_n", slots=lambda n, vocab_size, hidden_size: n, build_rows=teacher_samples,
        columns=(IDS, COUNTS),
        targets=_sampled_targets,
        metric_names=lambda meta: {"kl": "kl_estimate", "teacher_entropy": "teacher_entropy_estimate",
                                   "teacher_ce": None, "kd": "kd_estimate"},
        divergences=("forward_kl",),
        lacks="the teacher's probability of every token the student gives mass to, which a sampled cache does not "
              "have (p̂ is 0 off its draws)", size_name="n"),
    # the teacher's final hidden states and, once, its head: the exact logits, every divergence
    "hidden": CacheMode(
        "hidden", None, slots=lambda _, vocab_size, hidden_size: hidden_size,
        build_rows=lambda block, chunks, slots, inv_tau, generator: (block.hidden,),
        columns=(Column("hidden", True, torch.float32, lambda t, meta: t.to(LOG_P_DTYPES[meta.hidden_dtype]),
                        lambda t: t),),
        targets=lambda columns, meta, head: LiveTargets(columns["hidden"].to(head.weight.dtype), head),
        metric_names=lambda meta: {}, size_name="hidden size", keeps_head=True, tempered=False),
}


def save_head(directory: str, head: Head, vocab_size: int) -> dict:
    """The teacher's output head over the vocabulary, for a cache that `keeps_head`: its tensors to HEAD_FILE (as the
    teacher computes, e.g. bf16), its logit transforms returned for cache.json."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight[:vocab_size].detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias[:vocab_size].detach().cpu().contiguous()
    tmp = os.path.join(directory, HEAD_FILE + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, HEAD_FILE))
    return {"scale": head.scale, "softcap": head.softcap}


def load_head(directory: str, meta: CacheMeta, device: torch.device) -> Head:
    """The head a `keeps_head` cache stored, whole on every rank (V·H values: 1.1 GB in bf16 for a 152k × 3584 head)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, HEAD_FILE)
    if not os.path.exists(path) or meta.head is None:
        raise ConfigError(f"key teacher_cache: {directory} lacks the teacher's head ({HEAD_FILE}); build the cache "
                          "again into a new directory")
    tensors = load_file(path, device=str(device))
    return Head(tensors["weight"], tensors.get("bias"), meta.head["scale"], meta.head["softcap"])


def no_rows(meta: CacheMeta) -> tuple[torch.Tensor, ...]:
    """`teacher_rows`'s columns for no rows: what a rank holds where its share of the samples is only masked copies
    (a chunk with fewer samples than ranks, an evaluation micro-batch past the end of the data)."""
    return tuple(torch.zeros((0, meta.slots) if c.per_slot else (0,), dtype=c.dtype)
                 for c in CACHE_MODES[meta.mode].columns)


def stored_columns(meta: CacheMeta, columns: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """`teacher_rows`'s columns as a part stores them (packed ids, 16-bit log-probabilities, uint8 counts)."""
    return {c.name: c.store(t.cpu(), meta).contiguous() for c, t in zip(CACHE_MODES[meta.mode].columns, columns)}


def write_part(directory: str, name: str, samples: list[int], rows: list[tuple[torch.Tensor, ...]],
               meta: CacheMeta) -> int:
    """One part: each given sample's rows as `teacher_rows` made them, in sample order (none: a rank whose share of
    the chunk was only masked copies still writes its part, so the chunk counts as finished). Returns the bytes
    written."""
    from safetensors.torch import save_file

    counts = [r[0].shape[0] for r in rows]
    columns = tuple(torch.cat(column) for column in zip(*rows)) if rows else no_rows(meta)
    tensors = {"sample": torch.tensor(samples, dtype=torch.int64),
               "offsets": torch.tensor(np.cumsum([0] + counts), dtype=torch.int64), **stored_columns(meta, columns)}
    tmp = os.path.join(directory, name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, name))
    return os.path.getsize(os.path.join(directory, name))


# ------------------------------------------------------------------------------------------------ the training side
@dataclass(frozen=True)
class CacheRun:
    """What a training run that reads a cache must match (`check_cache_fits`), as its config gives it."""
    directory: str  # teacher_cache, as the config names it
    teacher_model: str | None
    pretrain: str
    temperature: float
    divergence: str  # the kd_loss the run trains (`LossSpec.effective_divergence`)
    token_settings: dict  # {key: value} of the tokenization settings, in `tokenized.TOKEN_SETTINGS` order
    teacher_context: list | None = None  # the privileged context the run names (`TeacherContext.rendering`), if any

    @classmethod
    def of(cls, cfg) -> CacheRun:
        from .privileged import TeacherContext
        from .tokenized import TOKEN_SETTINGS

        context = TeacherContext.of(cfg)
        return cls(cfg.teacher_cache, cfg.teacher_model, cfg.pretrain, cfg.kd_temperature,
                   effective_divergence(cfg.kd_loss, cfg.jsd_beta), {k: getattr(cfg, k) for k in TOKEN_SETTINGS},
                   list(context.rendering) if context else None)


def check_cache_fits(meta: CacheMeta, run: CacheRun, tokenizer, sources) -> None:
    """A training run reads a cache only if it was built for this run's tokens and temperature, and from the run's
    teacher_model when it names one: each mismatch is one line that names what differs.

    A run that names both a teacher and a cache trains from the cache and loads no teacher; the teacher must be the
    one the cache was built with, or the run would silently distil another model than the one its config names.
    Naming it is not refused, since the build and the run usually share one config (`--config run.yaml`)."""
    from .tokenized import tokenizer_fingerprint

    where = f"key teacher_cache: {run.directory}"
    if not meta.complete:
        raise ConfigError(f"{where} is incomplete (its build was interrupted); finish it by running cache_teacher "
                          "again with the same arguments")
    if run.teacher_model and teacher_identity(run.teacher_model) != meta.teacher:
        raise ConfigError(f"key teacher_model: {run.teacher_model} is not the teacher the cache {run.directory} was "
                          f"built with ({meta.teacher}); drop teacher_model to train from the cache, or build a cache "
                          "with this teacher")
    if run.teacher_context is not None and run.teacher_context != meta.teacher_context:
        built = meta.teacher_context[2:] if meta.teacher_context else "no context"
        raise ConfigError(f"key teacher_context_key: the cache {run.directory} was built with the teacher reading "
                          f"{built} (teacher_context_key, teacher_system_prompt), this run names "
                          f"{run.teacher_context[2:]}; drop both keys to train from the cache, or build a cache with "
                          "this context")
    if meta.teacher_tokenizer and meta.alignment != ALIGNMENT_VERSION:
        raise ConfigError(f"{where} was built with an older alignment of the two tokenizers (version "
                          f"{meta.alignment}; this version places the teacher's rows by version {ALIGNMENT_VERSION}, "
                          "e.g. the end of turn mapped by role); build the cache again")
    if meta.tokenizer != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{where} was built with another tokenizer or chat template than this run's pretrain "
                          f"{run.pretrain}; build a cache with this run's pretrain")
    if meta.temperature != run.temperature and CACHE_MODES[meta.mode].tempered:
        raise ConfigError(f"{where} holds the teacher at kd_temperature {meta.temperature:g}, this run has "
                          f"{run.temperature:g}; set kd_temperature {meta.temperature:g} or build a cache at "
                          f"{run.temperature:g}")
    cached = {s["samples_sha256"] for s in meta.sources}
    for source in sources:
        if source.samples_sha256 not in cached:
            changed = [f"{k} {meta.settings.get(k)!r} then, {value!r} now" for k, value in run.token_settings.items()
                       if meta.settings.get(k) != value]
            why = "; ".join(changed) if changed else "its files changed, or they are other files"
            raise ConfigError(f"{where} does not hold this run's data: {source.path} tokenizes to samples that the "
                              f"cache was not built from ({why}); build a cache for this data")
    mode = CACHE_MODES[meta.mode]
    if run.divergence not in mode.divergences:
        others = [m.name for m in CACHE_MODES.values() if run.divergence in m.divergences]
        raise ConfigError(f"key kd_loss: {run.divergence} needs {mode.lacks}; use {' or '.join(mode.divergences)}"
                          + (f", or a {' or '.join(others)} cache" if others else ", or a live teacher"))


class CacheRowsMismatch(RuntimeError):
    """A micro-batch's cached rows do not fit it: found by one rank in the middle of a step, so that rank says it
    (a ConfigError is said by rank 0 alone, as every rank finds it alike, which this one is not)."""


class CachedTeacher:
    """The teacher read from a cache (the `cache` kind of `teacher.TEACHERS`), in place of a live one: the cache's
    record gives the vocabulary, the cache must fit the run's data and kd_loss before any model loads (`check`), and
    no teacher model loads at all. Its mode (`CACHE_MODES`) says what the rows become for the loss.

    Loading reads every part's small `sample` and `offsets` tensors into an index (sample → part and rows) and closes
    the part again; a micro-batch then reads only its own samples' rows, memory-mapped, and moves them to the device
    in one copy per tensor. A build writes a part per chunk per rank (10⁵ of them at 64 ranks, above Linux's default
    vm.max_map_count of 65530), so at most `OPEN_PARTS` parts stay open (mapped) at once, the most recently read."""
    retokenize = None
    distills = True
    metric_groups: dict[str, dict[str, str | None]] = {}  # one teacher

    def __init__(self, run: CacheRun, meta: CacheMeta):
        self.run, self.directory, self.meta = run, os.path.expanduser(run.directory), meta
        self.mode = CACHE_MODES[meta.mode]
        self.vocab_size = self.teacher_vocab_size = meta.vocab_size

    @classmethod
    def from_config(cls, cfg, tokenizer) -> CachedTeacher:
        run = CacheRun.of(cfg)
        return cls(run, CacheMeta.load(os.path.expanduser(run.directory)))

    def check(self, tokenizer, sources, env) -> None:
        check_cache_fits(self.meta, self.run, tokenizer, sources)

    def load(self, env, dtype) -> None:
        """The index of the cache's rows, and the head a `keeps_head` mode stored."""
        from safetensors import safe_open

        directory, meta, self.device = self.directory, self.meta, env.device
        self.source_offset = {s["samples_sha256"]: s["offset"] for s in meta.sources}
        total = meta.num_samples
        self.part = np.full(total, -1, dtype=np.int64)
        self.start = np.zeros(total, dtype=np.int64)
        self.end = np.zeros(total, dtype=np.int64)
        self.files = sorted(f for f in os.listdir(directory) if is_part(f))
        for k, name in enumerate(self.files):
            with safe_open(os.path.join(directory, name), framework="pt") as handle:
                samples, offsets = handle.get_tensor("sample").numpy(), handle.get_tensor("offsets").numpy()
                self.part[samples] = k
                self.start[samples], self.end[samples] = offsets[:-1], offsets[1:]
        missing = int((self.part < 0).sum())
        if missing:
            raise ConfigError(f"key teacher_cache: {directory} lacks {missing} of its {total} samples; finish it by "
                              "running cache_teacher again with the same arguments")
        self._open = functools.lru_cache(maxsize=OPEN_PARTS)(self._open_part)
        self.head = load_head(directory, meta, self.device) if self.mode.keeps_head else None

    def verify(self, device: torch.device) -> None:
        pass  # no model: a kept head was the probed teacher's

    def describe(self) -> list[str]:
        meta, size = self.meta, self.mode.describe(self.meta.slots)
        head = ", and its output head (whole on every rank)" if self.mode.keeps_head else ""
        return [f"teacher: no model loaded; its {meta.mode} rows ({size}) from the cache {self.run.directory}, "
                f"{meta.bytes / max(meta.tokens, 1):.0f} bytes per token{head}"]

    def _open_part(self, k: int):
        from safetensors import safe_open

        return safe_open(os.path.join(self.directory, self.files[k]), framework="pt")

    @property
    def metric_names(self) -> dict[str, str | None]:
        """How the loss's metrics read against this cache (its mode's names: over buckets, estimated from draws);
        None drops a metric that the cache cannot give."""
        return self.mode.metric_names(self.meta)

    def index_of(self, source_sha: str, row: int) -> int:
        return self.source_offset[source_sha] + row

    def begin(self, batches) -> None:
        pass  # each micro-batch's rows are read when its targets are asked for

    def signalled(self, device) -> torch.Tensor:
        return no_signal(device)

    def close(self, preempted: bool = False) -> None:
        self._open.cache_clear()

    def targets(self, batch) -> AbstractContextManager[Targets]:
        """The cached distributions at the batch's target rows, in their order (samples in layout order, each
        sample's targets in position order). A batch of only masked copies has no samples and gets no rows."""
        host = self._read(batch.sample_keys) if batch.sample_keys else stored_columns(self.meta, no_rows(self.meta))
        rows = host[self.mode.columns[0].name].shape[0]
        if rows != batch.trainable_tokens:
            raise CacheRowsMismatch(f"key teacher_cache: the cache holds {rows} target rows for a micro-batch that "
                                    f"has {batch.trainable_tokens}; it was built from other data")
        loaded = {c.name: c.load(to_device(host[c.name], self.device)) for c in self.mode.columns}
        return nullcontext(self.mode.targets(loaded, self.meta, self.head))

    def _read(self, sample_keys: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """The stored columns of these samples' rows, concatenated on the host."""
        pieces: dict[str, list[torch.Tensor]] = {}
        for source, row in sample_keys:
            i = self.index_of(source, row)
            handle, start, end = self._open(int(self.part[i])), int(self.start[i]), int(self.end[i])
            for column in self.mode.columns:
                pieces.setdefault(column.name, []).append(handle.get_slice(column.name)[start:end])
        return {name: torch.cat(parts) for name, parts in pieces.items()}
