"""SFT data: records → token ids with shifted next-token targets on response tokens only → rank-sharded micro-batches.

One rule shapes this module: the loss mask is decided by token ids the model will really see, never by string
offsets. A prompt and its response are tokenized as the model consumes them (the chat template's own rendering of
the conversation when `apply_chat_template` is set), and the response is what follows the rendered prompt.

`targets[i]` is the id the model must predict at position i (the next token) when that token is a response token,
else IGNORE_INDEX. CE and KD both read this one shifted mask.
"""

from __future__ import annotations

import dataclasses
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
    first_bad_row: str | None = None

    def drop(self, reason: str, first: str | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_bad_row = self.first_bad_row or first

    def summary(self, name: str) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        line = f"{name}: {self.read} records read, {self.kept} kept ({self.truncated} truncated), dropped: {dropped}"
        return line + (f"; first bad row: {self.first_bad_row}" if self.first_bad_row else "")


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
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, f"{path}:{lineno}")
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{path}:{lineno}"
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return
    if path.endswith(".json"):
        with open(path, "rb") as f:
            text = _utf8(f.read(), path)
        try:
            records = json.loads(text)
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


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save the file "
                        "as UTF-8") from None


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "system": "system", "observation": "tool", "tool": "tool",
                  "function": "tool"}


def _field(record: object, key: str, where: str):
    """A record's string field, or a DataError that names the file, line and key."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where}: missing key '{key}' (set input_key/output_key to the record's field names)")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def _conversation(turns: list, key: str, where: str) -> list[dict]:
    """OpenAI `messages` (role/content) or ShareGPT `conversations` (from/value) → role/content messages."""
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: key '{key}' item {i} must be an object, got {type(turn).__name__}")
        if "role" in turn:
            role, content = turn["role"], turn.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(turn.get("from")), turn.get("value")
            if role is None:
                raise DataError(f"{where}: key '{key}' item {i} has unknown speaker {turn.get('from')!r}; "
                                f"known: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: key '{key}' item {i} needs a string content/value")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: key '{key}' has no assistant turn to train on")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise DataError(f"{where}: key '{key}' has an empty assistant turn")
    return messages


def _ids(rendered) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding in newer transformers."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def _render(tokenizer, messages, generation_prompt: bool = False) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt))


def chat_token_mask(messages: list[dict], tokenizer, all_assistant_turns: bool, where: str):
    """(ids, trainable) for a conversation rendered by the chat template.

    An assistant turn's tokens are those that the rendering up to and including that turn adds after the rendering
    of everything before it with the generation prompt: the content and whatever the template closes a turn with
    (`<|im_end|>`, Phi-3's `<|end|>`). Tokens that a template adds only at the very end of a rendering (Phi-3
    appends EOS) are trained only where they really appear: after the last turn.
    """
    full = _render(tokenizer, messages)
    trainable = [False] * len(full)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in assistant_turns if all_assistant_turns else assistant_turns[-1:]:
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        upto = _render(tokenizer, messages[:i + 1])
        if full[:start] != upto[:start]:
            raise DataError(f"{where}: the chat template renders turn {i} differently inside the whole "
                            "conversation, so its tokens cannot be located exactly")
        end = start
        while end < min(len(upto), len(full)) and upto[end] == full[end]:
            end += 1
        if end == start:
            raise DataError(f"{where}: assistant turn {i} renders to no tokens")
        trainable[start:end] = [True] * (end - start)
    return full, trainable


def tokenize_pair(prompt: str, response: str, cfg: TrainConfig, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as the model will see them, concatenated."""
    if cfg.apply_chat_template:
        ids, trainable = chat_token_mask([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenizer, False, where)
        split = trainable.index(True)
        return ids[:split], ids[split:]
    text = cfg.input_template.format(prompt) if cfg.input_template else prompt
    prompt_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def truncate(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Keeps the prompt's end (the question nearest the answer) and the response's start (what follows it).
    The prompt keeps at least half of max_len when both are long."""
    if len(prompt_ids) + len(response_ids) <= max_len:
        return prompt_ids, response_ids, False
    prompt_keep = min(len(prompt_ids), max(max_len - len(response_ids), max_len // 2))
    response_keep = max_len - prompt_keep
    return prompt_ids[len(prompt_ids) - prompt_keep:], response_ids[:response_keep], True


def sample_from_mask(input_ids: list[int], trainable: list[bool]) -> Sample:
    """Position i predicts token i+1 and is trained when token i+1 is trainable; token 0 is never a target."""
    targets = [input_ids[i + 1] if trainable[i + 1] else IGNORE_INDEX for i in range(len(input_ids) - 1)]
    return Sample(list(input_ids), targets + [IGNORE_INDEX])


def make_sample(prompt_ids: list[int], response_ids: list[int]) -> Sample:
    return sample_from_mask(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def record_to_sample(record: object, cfg: TrainConfig, tokenizer, where: str) -> tuple[Sample, bool]:
    """One record in any supported layout → (sample, truncated?). Raises DataError naming where and which key.

    Layouts: a conversation list under `input_key` (OpenAI messages or ShareGPT conversations, needs the chat
    template); Alpaca (`instruction` + optional `input` → `output`, recognized when `input_key` is left at `input`
    or set to `instruction`); prompt/response under `input_key`/`output_key`; with `pretrain_mode`, plain text where
    every token is trained.
    """
    if cfg.pretrain_mode:
        text = _field(record, cfg.input_key, where)
        if cfg.output_key in record:
            text += _field(record, cfg.output_key, where)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return sample_from_mask(ids[:cfg.max_len], [True] * min(len(ids), cfg.max_len)), len(ids) > cfg.max_len
    if isinstance(record, dict) and isinstance(record.get(cfg.input_key), list):
        if not cfg.apply_chat_template:
            raise DataError(f"{where}: key '{cfg.input_key}' holds a conversation; set apply_chat_template")
        messages = _conversation(record[cfg.input_key], cfg.input_key, where)
        ids, trainable = chat_token_mask(messages, tokenizer, cfg.multiturn, where)
        return sample_from_mask(ids[:cfg.max_len], trainable[:cfg.max_len]), len(ids) > cfg.max_len
    if isinstance(record, dict) and "instruction" in record and cfg.input_key in ("input", "instruction"):  # Alpaca
        prompt = _field(record, "instruction", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: key 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
    else:
        prompt = _field(record, cfg.input_key, where)
    response = _field(record, cfg.output_key, where)
    if not response.strip():
        raise DataError(f"{where}: key '{cfg.output_key}' is empty; a response is needed to train on")
    prompt_ids, response_ids = tokenize_pair(prompt, response, cfg, tokenizer, where)
    prompt_ids, response_ids, cut = truncate(prompt_ids, response_ids, cfg.max_len)
    return make_sample(prompt_ids, response_ids), cut


def load_sft_dataset(path: str, cfg: TrainConfig, tokenizer, max_samples: int | None,
                     split: str = "train") -> tuple[list[Sample], DataStats]:
    """Every record tokenized up front, so bad data fails before training (or, with skip_bad_rows, is counted)."""
    stats = DataStats()
    samples: list[Sample] = []
    for record, where in read_records(path, split):
        if max_samples is not None and stats.read >= max_samples:
            break
        stats.read += 1
        try:
            sample, cut = record_to_sample(record, cfg, tokenizer, where)
        except DataError as e:
            if not cfg.skip_bad_rows:
                raise
            stats.drop("bad rows", first=str(e))
            continue
        if sample.trainable_tokens == 0:
            stats.drop("with no trainable token left after truncation")
            continue
        stats.truncated += cut
        stats.kept += 1
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no usable samples ({stats.summary('dataset')})")
    return samples, stats


def mix_datasets(parts: list[list[Sample]], probs: list[float], seed: int) -> list[Sample]:
    """Draws from each dataset in proportion to `probs`, as many samples as the scarcest share allows."""
    total = min(len(part) / p for part, p in zip(parts, probs) if p > 0)
    rng = torch.Generator().manual_seed(seed)
    mixed = []
    for part, p in zip(parts, probs):
        mixed += [part[i] for i in torch.randperm(len(part), generator=rng)[:int(total * p)].tolist()]
    return mixed


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
    return MicroBatch(ids, mask, targets)


def collate_packed(samples: list[Sample], max_len: int, pad_id: int) -> MicroBatch:
    """The micro-batch's samples packed into as few rows of at most max_len as first-fit-decreasing finds."""
    rows = pack(samples, max_len)
    batch = collate([Sample(sum((s.input_ids for s in row), []), sum((s.targets for s in row), []))
                     for row in rows], pad_id)
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


def eval_shards(samples: list[Sample], micro_batch_size: int, rank: int, world_size: int) -> list[list[Sample]]:
    """Round-robin shard; short ranks are topped up with masked copies so all ranks run the same forwards."""
    mine = samples[rank::world_size]
    per_rank = -(-len(samples) // world_size)
    mine = mine + [masked_copy(samples[0])] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
