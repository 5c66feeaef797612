"""Tokenize once, memory-map everywhere.

A data source is tokenized a single time per node into an Arrow table (int32 ids, the trained positions as a few
[start, end) spans), cached on disk under a key made of everything that changes the tokens: the data files (path,
size, modification time), the tokenizer and its chat template, the layout settings and this module's format
version. Every later run and every restart of the same run opens the table memory-mapped, and each rank reads the
rows of its own micro-batches when it needs them, so a rank's memory does not grow with the dataset.

The build uses `datasets.map(num_proc=...)` over the same per-record code as everything else
(`records.record_to_sample`), so a cached sample is exactly the sample the records would give. Bad rows keep their
file:line:key report: the first records are tried in this process before any worker starts (a wrong key fails in a
second), and a bad row further in fails the build with its own location, or is counted with `skip_bad_rows`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .cross_tokenizer import ALIGNMENT_VERSION, teacher_fields
from .records import (IGNORE_INDEX, LOCAL_SUFFIXES, DataError, DataStats, Sample, TokenSettings, looks_local,
                      parse_record, raw_records, record_to_sample, teacher_named)

FORMAT_VERSION = 2  # bump when the stored columns or the tokenization rules change (2: conversations cut from the left)
DEFAULT_CACHE = "~/.cache/fsdp_kd/tokenized"
TOKEN_SETTINGS = tuple(f.name for f in dataclasses.fields(TokenSettings))  # the config keys a cache's key records
NO_TARGET = "with no trainable token left after truncation"
PROBE_RECORDS = 32  # tried in-process before the parallel build, so a wrong key fails at once
META_FILE = "fsdp_kd_tokenized.json"
# a teacher with its own tokenizer (cross_tokenizer): its ids of the sample, and the alignment's groups (each side's
# token index where each group ends, `cross_tokenizer.Alignment`), and the groups that hold a special token
# (`cross_tokenizer.special_groups`); empty lists where the sample could not be aligned
TEACHER_COLUMNS = ("teacher_ids", "student_group_ends", "teacher_group_ends", "special_groups")
# several teachers routed per record (`teacher_key`): the teacher each record names, and where the record is, to say
# where a name no teacher has comes from (the names are the run's, checked when the table is opened)
ROUTE_COLUMNS = ("teacher_name", "where")


@dataclasses.dataclass(frozen=True)
class DataSources:
    """A run's training and eval sources and how their records become samples: what `open_sources` opens."""
    train_paths: tuple[str, ...]  # `dataset`, split at its commas
    train_split: str
    max_samples: int | None  # per training source
    eval_path: str | None
    eval_split: str
    max_eval_samples: int | None
    cache_dir: str | None  # `data_cache_dir`; none: `cache_root`'s default
    settings: TokenSettings
    teacher_key: str | None = None  # several teachers routed per record: the field naming each record's teacher
    spans: bool = True  # across tokenizers: the samples lay out the groups of several tokens (the span term is on)


def cache_root(cache_dir: str | None) -> str:
    return os.path.expanduser(cache_dir or os.environ.get("FSDP_KD_DATA_CACHE") or DEFAULT_CACHE)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the tokenizer's model, normalizer and special tokens, and its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token_id,
                         tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def source_files(path: str) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return sorted(str(p) for p in Path(path).iterdir() if p.suffix in LOCAL_SUFFIXES)
    return [path]


def cache_key(path: str, split: str, max_samples: int | None, settings: TokenSettings, tokenizer,
              teacher=None, teacher_key: str | None = None) -> dict:
    """Everything that changes the tokenized samples of one source (and, with a teacher of its own tokenizer, its
    tokens of them; routed per record, each such teacher's by its name)."""
    if looks_local(path):
        source = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in source_files(path)]
    else:
        source = [path, split]  # a hub dataset: its name and split (datasets keeps its own revision cache)
    key = {"format": FORMAT_VERSION, "source": source, "max_samples": max_samples,
           "tokenizer": tokenizer_fingerprint(tokenizer),
           "settings": dataclasses.asdict(settings)}
    if teacher is not None:
        key["teacher_tokenizer"] = ({name: _tokenization_key(t) for name, t in sorted(teacher.items())}
                                    if isinstance(teacher, dict) else _tokenization_key(teacher))
    if teacher_key is not None:
        key["teacher_key"] = teacher_key
    return key


def _tokenization_key(teacher) -> list:
    return [tokenizer_fingerprint(teacher.tokenizer), ALIGNMENT_VERSION, teacher.max_positions, *teacher.rendering]


class TokenizedDataset:
    """One tokenized source, memory-mapped. `ds[i]` reads and rebuilds sample i; `lengths` are its token counts."""

    def __init__(self, directory: str, path: str = "", spans: bool = True):
        self.directory, self.path = directory, path  # the cache directory; the data it was tokenized from
        self.with_spans = spans  # its samples' groups of several tokens laid out (`cross_tokenizer.teacher_fields`)
        with open(os.path.join(directory, META_FILE)) as f:
            self.meta = json.load(f)
        table = _memory_mapped_table(directory)
        self.input_ids, self.spans = table.column("input_ids"), table.column("spans")
        self.lengths = table.column("length").to_numpy()
        self.teacher = {name: table.column(name) for name in TEACHER_COLUMNS if name in table.column_names}
        self.route = {name: table.column(name) for name in ROUTE_COLUMNS if name in table.column_names}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i) -> Sample:
        i = int(i)
        sample = sample_from_spans(self.input_ids[i].as_py(), self.spans[i].as_py())
        sample.source, sample.row = self.samples_sha256, int(i)
        if self.teacher:
            columns = (self.teacher[name][i].as_py() for name in TEACHER_COLUMNS)
            sample = dataclasses.replace(sample, **teacher_fields(*columns, len(sample.input_ids), self.with_spans))
        return sample

    def teachers(self, names: tuple[str, ...], key: str) -> np.ndarray:
        """Each sample's teacher index in `names`, from the teacher its record names under `key` (routed per
        record); a name that no teacher has is refused where its record is."""
        import pyarrow as pa
        import pyarrow.compute as pc

        named = self.route["teacher_name"]
        index = pc.index_in(named, value_set=pa.array(names))
        if index.null_count:
            row = pc.index(pc.is_null(index), True).as_py()
            raise DataError(f"{self.route['where'][row].as_py()}: key '{key}' names the teacher "
                            f"{named[row].as_py()!r}, which no teacher has; the teachers are {', '.join(names)}")
        return index.to_numpy(zero_copy_only=False).astype(np.int64)

    @property
    def stats(self) -> DataStats:
        return DataStats(**self.meta["stats"])

    @property
    def samples_sha256(self) -> str:
        """A hash of every stored sample, in order: what a teacher cache checks it was built from."""
        return self.meta["samples_sha256"]


def _memory_mapped_table(directory: str):
    """The table `datasets.save_to_disk` wrote there, memory-mapped with pyarrow alone: reading needs none of
    `datasets`, whose import costs every rank about a second of start-up (it is imported only to build a cache)."""
    import pyarrow as pa

    with open(os.path.join(directory, "state.json")) as f:
        files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(os.path.join(directory, name))).read_all()
                             for name in files])


def sample_from_spans(input_ids: list[int], spans: list[int]) -> Sample:
    """Targets from the trained positions: position p predicts input_ids[p + 1] when p lies in a span."""
    targets = [IGNORE_INDEX] * len(input_ids)
    for start, end in zip(spans[::2], spans[1::2]):
        targets[start:end] = input_ids[start + 1:end + 1]
    return Sample(list(input_ids), targets)


def spans_of(sample: Sample) -> list[int]:
    """The trained positions of a sample as flat [start, end, start, end, ...]."""
    spans: list[int] = []
    for p, t in enumerate(sample.targets):
        if t == IGNORE_INDEX:
            continue
        if spans and spans[-1] == p:
            spans[-1] = p + 1
        else:
            spans += [p, p + 1]
    return spans


def _tokenize_batch(batch: dict, settings: TokenSettings, tokenizer, teacher=None, teacher_key: str | None = None
                    ) -> dict:
    """Each record's sample, with its teacher's own tokens where `teacher` gives them: one teacher's for every
    record, or (routed per record) a dict by teacher name of those that read their own, the record's teacher's."""
    out: dict[str, list] = {"input_ids": [], "spans": [], "length": [], "truncated": [], "error": []}
    if teacher is not None:
        out.update({name: [] for name in TEACHER_COLUMNS})
    if teacher_key is not None:
        out.update({name: [] for name in ROUTE_COLUMNS})
    for text, where in zip(batch["record"], batch["where"]):
        sample, cut, error, columns, named = Sample([], []), False, None, ([], [], [], []), ""
        try:
            record = parse_record(text, where)
            sample, cut = record_to_sample(record, settings, tokenizer, where)
            named = teacher_named(record, teacher_key, where) if teacher_key is not None else ""
            own = teacher.get(named) if isinstance(teacher, dict) else teacher
            if sample.trainable_tokens == 0:
                error = NO_TARGET
            elif own is not None:
                columns = own.record_columns(record, sample, settings, where)
        except DataError as e:
            error = str(e)
        out["input_ids"].append(sample.input_ids)
        out["spans"].append(spans_of(sample))
        out["length"].append(len(sample.input_ids))
        out["truncated"].append(cut)
        out["error"].append(error)
        if teacher_key is not None:
            out["teacher_name"].append(named)
            out["where"].append(where)
        if teacher is not None:
            for name, values in zip(TEACHER_COLUMNS, columns if error is None else ([], [], [], [])):
                out[name].append(values)
    return out


def open_tokenized(path: str, split: str, max_samples: int | None, settings: TokenSettings, cache_dir: str | None,
                   tokenizer, local_rank: int, share: Callable[[str | None], list] = lambda error: [error], log=print,
                   teacher=None, teacher_key: str | None = None, spans: bool = True) -> TokenizedDataset:
    """The source's tokenized table: built by local rank 0 of each node if no run has built it yet, else opened from
    the cache. `share` exchanges each rank's build error (None if none) with every rank, and doubles as the wait
    for the build: every rank fails with the builder's message, rather than waiting on a barrier for a rank that
    has died. Its samples lay out a teacher's groups of several tokens with `spans` (`DataSources.spans`)."""
    key = cache_key(path, split, max_samples, settings, tokenizer, teacher, teacher_key)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(path.rstrip("/")))[:60]
    directory = os.path.join(cache_root(cache_dir), f"{name}-{digest}")
    failure, error = None, None
    if not os.path.exists(os.path.join(directory, META_FILE)) and local_rank == 0:
        try:
            build_tokenized(path, split, max_samples, settings, tokenizer, key, directory, log, teacher, teacher_key)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, whatever it is
            failure, error = e, str(e) if isinstance(e, DataError) else f"{path}: tokenizing failed: {e!r}"
    errors = [e for e in share(error) if e]
    if failure is not None:
        raise failure
    if errors:
        raise DataError(errors[0])
    if not os.path.exists(os.path.join(directory, META_FILE)):
        raise DataError(f"{path}: the tokenized cache {directory} was not built (it must be on a file system that "
                        "every rank of a node sees)")
    log(f"{path}: tokenized cache {directory}")
    return TokenizedDataset(directory, path, spans)


def open_sources(sources: DataSources, tokenizer, local_rank: int, share: Callable[[str | None], list] = lambda e: [e],
                 log=print, teacher=None) -> tuple[list[TokenizedDataset], TokenizedDataset | None]:
    """A run's training sources and its eval source (or None); with `teacher` (a
    `cross_tokenizer.TeacherTokenization`), each sample holds the teacher's tokens too. Several teachers give a
    function of each source's index (None: the eval source) instead (`routing.RowRouting.own_tokens`)."""
    def source(k: int | None, path: str, split: str, max_samples: int | None, what: str) -> TokenizedDataset:
        table = open_tokenized(path, split, max_samples, sources.settings, sources.cache_dir, tokenizer, local_rank,
                               share, log, teacher(k) if callable(teacher) else teacher, sources.teacher_key,
                               sources.spans)
        log(table.stats.summary(f"{what} {path}"))
        return table

    train = [source(k, path, sources.train_split, sources.max_samples, "train data")
             for k, path in enumerate(sources.train_paths)]
    held_out = (source(None, sources.eval_path, sources.eval_split, sources.max_eval_samples, "eval data")
                if sources.eval_path else None)
    return train, held_out


def build_tokenized(path: str, split: str, max_samples: int | None, settings: TokenSettings, tokenizer, key: dict,
                    directory: str, log=print, teacher=None, teacher_key: str | None = None) -> None:
    """Tokenizes a source into `directory`, atomically: it is written beside it and renamed into place, so a
    killed build leaves nothing that a later run would take for a finished one."""
    import datasets

    started = time.perf_counter()
    _probe(path, split, settings, tokenizer)
    work = f"{directory}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    datasets.disable_progress_bars()  # one bar, for the tokenizing; reading and saving are quick
    try:
        raw = datasets.Dataset.from_generator(
            _limited_records, gen_kwargs={"path": path, "split": split, "limit": max_samples},
            features=datasets.Features({"record": datasets.Value("string"), "where": datasets.Value("string")}),
            cache_dir=os.path.join(work, "raw"))
        features = datasets.Features({
            "input_ids": datasets.List(datasets.Value("int32")), "spans": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"), "truncated": datasets.Value("bool"),
            "error": datasets.Value("string"),
            **({name: datasets.List(datasets.Value("int32")) for name in TEACHER_COLUMNS}
               if teacher is not None else {}),
            **({name: datasets.Value("string") for name in ROUTE_COLUMNS} if teacher_key is not None else {})})
        workers = max(1, min(os.cpu_count() or 1, len(raw) // 1000))
        datasets.enable_progress_bars()
        with contextlib.redirect_stderr(sys.stdout):  # progress is output; stderr stays for errors
            tokenized = raw.map(_tokenize_batch, batched=True, batch_size=256,
                                num_proc=workers if workers > 1 else None,
                                fn_kwargs={"settings": settings, "tokenizer": tokenizer, "teacher": teacher,
                                           "teacher_key": teacher_key},
                                remove_columns=["record", "where"],
                                features=features, desc=f"tokenizing {os.path.basename(path)}",
                                cache_file_name=os.path.join(work, "map", "tokenized.arrow"))
        datasets.disable_progress_bars()
        stats, kept = _tally(tokenized, settings.skip_bad_rows)
        if len(kept) == 0:
            raise DataError(f"{path}: no usable samples ({stats.summary('dataset')})")
        table = tokenized.select(kept).remove_columns(["error", "truncated"])
        table.save_to_disk(os.path.join(work, "table"))
        meta = {"key": key, "stats": stats.__dict__, "samples_sha256": _content_hash(os.path.join(work, "table")),
                "built_seconds": round(time.perf_counter() - started, 1)}
        with open(os.path.join(work, "table", META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        try:
            os.replace(os.path.join(work, "table"), directory)
        except OSError:
            if not os.path.exists(os.path.join(directory, META_FILE)):  # else another node finished it first
                raise
    finally:
        datasets.enable_progress_bars()
        shutil.rmtree(work, ignore_errors=True)
    log(f"{path}: tokenized {stats.kept} samples in {time.perf_counter() - started:.1f} s with {workers} "
        f"process{'es' if workers > 1 else ''}")


def _limited_records(path: str, split: str, limit: int | None):
    for n, (text, where) in enumerate(raw_records(path, split)):
        if limit is not None and n >= limit:
            return
        yield {"record": text, "where": where}


def _probe(path: str, split: str, settings: TokenSettings, tokenizer) -> None:
    """The first records, in this process: a wrong key or layout fails in a second, not after the whole build (and
    an empty source fails here, where `datasets` would only say that a split holds no data)."""
    n = 0
    for n, (text, where) in enumerate(raw_records(path, split), 1):
        if n > PROBE_RECORDS:
            return
        if not settings.skip_bad_rows:
            record_to_sample(parse_record(text, where), settings, tokenizer, where)
    if n == 0:
        raise DataError(f"{path}: no usable samples (no records)")


def _tally(tokenized, skip_bad_rows: bool) -> tuple[DataStats, np.ndarray]:
    """(stats, indices of the kept rows); the first bad row is an error unless bad rows are skipped."""
    errors = tokenized.data.column("error")
    bad = np.asarray(errors.is_valid())
    stats = DataStats(read=len(tokenized), kept=int((~bad).sum()))
    for i in np.flatnonzero(bad):
        why = errors[int(i)].as_py()
        if why == NO_TARGET:
            stats.drop(NO_TARGET)
        elif not skip_bad_rows:
            raise DataError(why)
        else:
            stats.drop("bad rows", first=why)
    kept = np.flatnonzero(~bad)
    stats.truncated = int(np.asarray(tokenized.data.column("truncated").to_numpy(zero_copy_only=False))[kept].sum())
    return stats, kept


def _content_hash(directory: str) -> str:
    """sha256 over the stored ids and spans, in row order: the student's samples (a teacher's tokens, where stored,
    follow from them and the teacher's tokenizer, which the cache's key holds), so a teacher cache built on them
    fits a run that reads the same samples without them."""
    import datasets

    table = datasets.load_from_disk(directory).data
    h = hashlib.sha256()
    for column in ("input_ids", "spans"):
        for chunk in table.column(column).chunks:
            h.update(np.diff(chunk.offsets.to_numpy()).astype(np.int64).tobytes())
            h.update(chunk.flatten().to_numpy().astype(np.int32).tobytes())
    return h.hexdigest()
