"""SFT data: records → token ids with shifted next-token targets on response tokens only → rank-sharded micro-batches.

One rule shapes this module: the loss mask is decided by token ids the model will really see, never by string
offsets. A prompt and its response are tokenized as the model consumes them (the chat template's own rendering of
the conversation when `apply_chat_template` is set), and the response is what follows the rendered prompt.

`targets[i]` is the id the model must predict at position i (the next token) when that token is a response token,
else IGNORE_INDEX. CE and KD both read this one shifted mask.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, TrainConfig

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ConfigError):
    """Bad data, reported as 'file:line: key ...: what is wrong'."""


@dataclass
class Sample:
    input_ids: list[int]
    targets: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class DataStats:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self, name: str) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return f"{name}: {self.read} records read, {self.kept} kept ({self.truncated} truncated), dropped: {dropped}"


def looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or path.endswith(LOCAL_SUFFIXES) or os.path.exists(path))


def check_data_path(path: str, key: str) -> None:
    if looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"key {key}: path not found: {path}")


def read_records(path: str, split: str = "train") -> Iterator[tuple[object, str]]:
    """Yields (record, 'where') pairs; 'where' is file:line for JSONL, file[index] for JSON arrays and tables."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
        for f in files:
            yield from read_records(str(f), split)
        return
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{path}:{lineno}"
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records (or use .jsonl, one record per line)")
        for i, record in enumerate(records):
            yield record, f"{path}[{i}]"
        return
    import datasets  # tables and hub datasets

    if path.endswith((".parquet", ".csv")):
        table = datasets.load_dataset(path.rsplit(".", 1)[1], data_files=path, split="train")
    else:
        table = datasets.load_dataset(path, split=split)
    for i, record in enumerate(table):
        yield record, f"{path}[{i}]"


def _text_field(record: object, key: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where}: missing key '{key}' (set input_key/output_key to the record's field names)")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def tokenize_pair(prompt: str, response: str, cfg: TrainConfig, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as the model will see them, concatenated."""
    if cfg.apply_chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        prompt_ids = _ids(tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True))
        full_ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise DataError(f"{where}: the chat template renders the prompt differently inside the full "
                            "conversation, so the response tokens cannot be located exactly")
        return prompt_ids, full_ids[len(prompt_ids):]
    text = cfg.input_template.format(prompt) if cfg.input_template else prompt
    prompt_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def _ids(rendered) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding in newer transformers."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def truncate(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Keeps the prompt's end (the question nearest the answer) and the response's start (what follows it).
    The prompt keeps at least half of max_len when both are long."""
    if len(prompt_ids) + len(response_ids) <= max_len:
        return prompt_ids, response_ids, False
    prompt_keep = min(len(prompt_ids), max(max_len - len(response_ids), max_len // 2))
    response_keep = max_len - prompt_keep
    return prompt_ids[len(prompt_ids) - prompt_keep:], response_ids[:response_keep], True


def make_sample(prompt_ids: list[int], response_ids: list[int]) -> Sample:
    """Position i predicts token i+1; only predictions of response tokens are trained."""
    input_ids = prompt_ids + response_ids
    targets = [IGNORE_INDEX] * len(input_ids)
    for i in range(max(len(prompt_ids) - 1, 0), len(input_ids) - 1):
        targets[i] = input_ids[i + 1]
    return Sample(input_ids, targets)


def load_sft_dataset(path: str, cfg: TrainConfig, tokenizer, max_samples: int | None) -> tuple[list[Sample], DataStats]:
    stats = DataStats()
    samples: list[Sample] = []
    for record, where in read_records(path):
        if max_samples is not None and stats.read >= max_samples:
            break
        stats.read += 1
        prompt = _text_field(record, cfg.input_key, where)
        response = _text_field(record, cfg.output_key, where)
        if not response.strip():
            raise DataError(f"{where}: key '{cfg.output_key}' is empty; a response is needed to train on")
        prompt_ids, response_ids = tokenize_pair(prompt, response, cfg, tokenizer, where)
        prompt_ids, response_ids, cut = truncate(prompt_ids, response_ids, cfg.max_len)
        sample = make_sample(prompt_ids, response_ids)
        if sample.trainable_tokens == 0:
            stats.dropped["with no response token left after truncation"] = \
                stats.dropped.get("with no response token left after truncation", 0) + 1
            continue
        stats.truncated += cut
        stats.kept += 1
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no usable samples ({stats.summary('dataset')})")
    return samples, stats


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T], IGNORE_INDEX where nothing is trained

    @property
    def trainable_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))


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
    return MicroBatch(ids, mask, targets)


def masked_copy(sample: Sample) -> Sample:
    """A stand-in that trains nothing: it keeps a rank's collectives in step when it has run out of real data."""
    return Sample(sample.input_ids, [IGNORE_INDEX] * len(sample.targets))


class StepSampler:
    """Which samples each rank trains on at each step: deterministic, seeded by epoch, disjoint across ranks.

    A global batch is `train_batch_size` consecutive indices of the epoch's permutation. Rank r takes the r-th
    contiguous slice of it and cuts that into micro-batches, so 1 rank × 2 accumulation steps and 2 ranks × 1 see
    the same samples. The last partial global batch of an epoch is dropped, so every rank takes the same steps.
    """

    def __init__(self, num_samples: int, cfg: TrainConfig, rank: int, world_size: int, accumulation: int):
        self.num_samples, self.cfg, self.rank, self.world, self.accumulation = num_samples, cfg, rank, world_size, accumulation
        self.steps_per_epoch = num_samples // cfg.train_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"dataset: {num_samples} usable samples is fewer than train_batch_size "
                            f"{cfg.train_batch_size}; lower train_batch_size or add data")

    def indices(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(self.num_samples, generator=g)
        per_rank = self.cfg.micro_train_batch_size * self.accumulation
        start = step_in_epoch * self.cfg.train_batch_size + self.rank * per_rank
        mine = order[start:start + per_rank].tolist()
        mbs = self.cfg.micro_train_batch_size
        return [mine[i:i + mbs] for i in range(0, per_rank, mbs)]


def eval_batches(samples: list[Sample], micro_batch_size: int, rank: int, world_size: int, pad_id: int) -> list[MicroBatch]:
    """Round-robin shard; short ranks are topped up with masked copies so all ranks run the same forwards."""
    mine = samples[rank::world_size]
    per_rank = -(-len(samples) // world_size)
    mine = mine + [masked_copy(samples[0])] * (per_rank - len(mine))
    return [collate(mine[i:i + micro_batch_size], pad_id) for i in range(0, len(mine), micro_batch_size)]
