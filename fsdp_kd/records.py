"""SFT records → samples: token ids with shifted next-token targets on response tokens only.

One rule shapes this module: the loss mask is decided by token ids the model will really see, never by string
offsets. A prompt and its response are tokenized as the model consumes them (the chat template's own rendering of
the conversation when `apply_chat_template` is set), and the response is what follows the rendered prompt.

`targets[i]` is the id the model must predict at position i (the next token) when that token is a response token,
else IGNORE_INDEX. CE and KD both read this one shifted mask.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ConfigError):
    """Bad data, reported as 'file:line: key ...: what is wrong'."""


@dataclass(frozen=True)
class TokenSettings:
    """The keys that decide which sample each record gives (a tokenized cache's key records them all)."""
    input_key: str
    output_key: str
    input_template: str | None
    apply_chat_template: bool
    multiturn: bool
    pretrain_mode: bool
    max_len: int
    skip_bad_rows: bool  # a bad record is dropped and counted instead of stopping the run (`tokenized`)

    def __post_init__(self):
        if self.input_template is not None and self.input_template.count("{}") != 1:
            raise ConfigError(f"input_template must contain exactly one '{{}}' for the prompt, got "
                              f"{self.input_template!r}", "input_template")


@dataclass
class Sample:
    input_ids: list[int]
    targets: list[int]
    # where it was read from: the tokenized source's sample hash and its row there (a teacher cache's key)
    source: str = field(default="", compare=False)
    row: int = field(default=-1, compare=False)
    # a teacher with its own tokenizer (cross_tokenizer): its tokens of the same text, and for each position of
    # this sample the teacher position predicting the same token, or -1 (`cross_tokenizer.Alignment`)
    teacher_ids: list[int] | None = None
    teacher_positions: list[int] | None = None
    # its groups of several tokens on a side, each (s0, s1, t0, t1): the student positions [s0, s1) and the teacher
    # positions [t0, t1) that predict the group's tokens (`cross_tokenizer.Alignment.spans`)
    teacher_spans: list[tuple[int, int, int, int]] | None = None
    # several teachers (`routing`): the index of the teacher this sample is routed to; None with one teacher
    teacher: int | None = field(default=None, compare=False)

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
    for text, where in raw_records(path, split):
        yield parse_record(text, where), where


def parse_record(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def raw_records(path: str, split: str = "train") -> Iterator[tuple[str, str]]:
    """Yields (record as JSON text, 'where'): a JSONL line as it is (parsed later, in the tokenizing workers), a JSON
    array's or a table's records serialized one by one."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
        for f in files:
            yield from raw_records(str(f), split)
        return
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, f"{path}:{lineno}")
                if line.strip():
                    yield line, f"{path}:{lineno}"
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
            yield json.dumps(record), f"{path}[{i}]"
        return
    import datasets  # tables and hub datasets

    if path.endswith((".parquet", ".csv")):
        table = datasets.load_dataset(path.rsplit(".", 1)[1], data_files=path, split="train")
    else:
        table = datasets.load_dataset(path, split=split)
    for i, record in enumerate(table):
        yield json.dumps(record, default=str), f"{path}[{i}]"


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


def teacher_named(record: object, key: str, where: str) -> str:
    """The teacher a record names under `key` (several teachers routed per record, `teacher_key`)."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing key '{key}' (teacher_key): each record names its teacher there; add it, "
                        "or route per source with dataset_teachers")
    if not isinstance(record[key], str) or not record[key]:
        raise DataError(f"{where}: key '{key}' must name the record's teacher, got {record[key]!r}")
    return record[key]


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


def _render_text(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_token_mask(messages: list[dict], tokenizer, all_assistant_turns: bool, where: str):
    """(ids, trainable) for a conversation rendered by the chat template.

    An assistant turn's tokens are those that the rendering up to and including that turn adds after the rendering
    of everything before it with the generation prompt: the content and whatever the template closes a turn with
    (`<|im_end|>`, Phi-3's `<|end|>`). Tokens that a template adds only at the very end of a rendering (Phi-3
    appends EOS) are trained only where they really appear: after the last turn.

    The conversation is tokenized once, as `apply_chat_template(tokenize=True)` does (the rendered text, no added
    special tokens); the prefixes are only rendered as text, and their ends are found among the tokens by their
    character offsets. So a k-turn conversation costs one tokenization, not 2k + 1 of growing prefixes. A token
    that begins before a turn's text belongs to the prompt (a special token whose span swallows the whitespace
    after it, like Phi-3's `<|assistant|>\n`); a token is in the turn if it ends within the text the turn's own
    rendering shares with the whole conversation.
    """
    text = _render_text(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: chat masks need a fast tokenizer (character offsets); this model's tokenizer "
                        f"is {type(tokenizer).__name__}")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    starts = [s for s, _ in encoded["offset_mapping"]]
    ends = [e for _, e in encoded["offset_mapping"]]
    trainable = [False] * len(ids)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in assistant_turns if all_assistant_turns else assistant_turns[-1:]:
        before = _render_text(tokenizer, messages[:i], generation_prompt=True)
        if not text.startswith(before):
            raise DataError(f"{where}: the chat template renders turn {i} differently inside the whole "
                            "conversation, so its tokens cannot be located exactly")
        upto = _render_text(tokenizer, messages[:i + 1])
        shared = len(upto) if text.startswith(upto) else _shared_prefix(upto, text, len(before))
        start, end = bisect.bisect_left(starts, len(before)), bisect.bisect_right(ends, shared)
        if end <= start:
            raise DataError(f"{where}: assistant turn {i} renders to no tokens")
        trainable[start:end] = [True] * (end - start)
    return ids, trainable


def _shared_prefix(a: str, b: str, known: int) -> int:
    """Length of the common prefix of a and b, given that their first `known` characters agree."""
    n = known
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(prompt: str, response: str, settings: TokenSettings, tokenizer,
                  where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as the model will see them, concatenated."""
    if settings.apply_chat_template:
        ids, trainable = chat_token_mask([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenizer, False, where)
        split = trainable.index(True)
        return ids[:split], ids[split:]
    text = settings.input_template.format(prompt) if settings.input_template else prompt
    prompt_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def truncate(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Keeps the prompt's end (the question nearest the answer) and the response's start (what follows it).
    The prompt keeps at least half of max_len when both are long."""
    prompt_keep, response_keep = _kept_lengths(len(prompt_ids), len(response_ids), max_len)
    cut = prompt_keep + response_keep < len(prompt_ids) + len(response_ids)
    return prompt_ids[len(prompt_ids) - prompt_keep:], response_ids[:response_keep], cut


def _kept_lengths(prompt_len: int, response_len: int, max_len: int) -> tuple[int, int]:
    """How many tokens `truncate` keeps of the prompt's end and of the response's start."""
    if prompt_len + response_len <= max_len:
        return prompt_len, response_len
    prompt_keep = min(prompt_len, max(max_len - response_len, max_len // 2))
    return prompt_keep, max_len - prompt_keep


def truncate_conversation(ids: list[int], trainable: list[bool], max_len: int):
    """(ids, trainable, cut?): a rendered conversation cut as `truncate` cuts a prompt and its response, the response
    being the final trained turn onward and the prompt everything before it. So the earliest turns go first and the
    final assistant turn stays (a cut from the right would drop it, while prompt/response keeps its response); in
    multiturn, the earlier assistant turns that still fit stay trained."""
    if len(ids) <= max_len:
        return ids, trainable, False
    split = len(trainable) - trainable[::-1].index(True)  # just after the last trained token
    while split > 0 and trainable[split - 1]:
        split -= 1
    prompt_keep, response_keep = _kept_lengths(split, len(ids) - split, max_len)
    kept = slice(split - prompt_keep, split + response_keep)
    return ids[kept], trainable[kept], True


def sample_from_mask(input_ids: list[int], trainable: list[bool]) -> Sample:
    """Position i predicts token i+1 and is trained when token i+1 is trainable; token 0 is never a target."""
    targets = [input_ids[i + 1] if trainable[i + 1] else IGNORE_INDEX for i in range(len(input_ids) - 1)]
    return Sample(list(input_ids), targets + [IGNORE_INDEX])


def make_sample(prompt_ids: list[int], response_ids: list[int]) -> Sample:
    return sample_from_mask(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


# ------------------------------------------------------------------------------------------------ record layouts
# Each layout is one function: (record, settings, tokenizer, where) -> (sample, truncated?), or None when the record
# does not have its shape. `RECORD_LAYOUTS` tries them in order; a new format is one more entry.
Layout = Callable[[object, TokenSettings, object, str], "tuple[Sample, bool] | None"]
CONVERSATION_KEYS = ("messages", "conversations")


def pretrain_text(record, settings: TokenSettings, tokenizer, where: str):
    """With `pretrain_mode`: plain text under `input_key` (plus `output_key` if present), every token trained."""
    if not settings.pretrain_mode:
        return None
    text = _field(record, settings.input_key, where)
    if settings.output_key in record:
        text += _field(record, settings.output_key, where)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    kept = min(len(ids), settings.max_len)
    return sample_from_mask(ids[:kept], [True] * kept), len(ids) > settings.max_len


def conversation(record, settings: TokenSettings, tokenizer, where: str):
    """A conversation list (OpenAI messages or ShareGPT conversations) under `input_key`, or, recognized by its
    shape, under `messages` or `conversations` when the record has no `input_key` (as LLaMA-Factory does). Needs
    the chat template."""
    key = conversation_key(record, settings)
    if key is None:
        return None
    if not settings.apply_chat_template:
        raise DataError(f"{where}: key '{key}' holds a conversation; set apply_chat_template")
    messages = _conversation(record[key], key, where)
    ids, trainable = chat_token_mask(messages, tokenizer, settings.multiturn, where)
    ids, trainable, cut = truncate_conversation(ids, trainable, settings.max_len)
    return sample_from_mask(ids, trainable), cut


def conversation_key(record, settings: TokenSettings) -> str | None:
    """The key of a record's conversation list, as `conversation` finds it; None for a record of another layout."""
    if not isinstance(record, dict):
        return None
    keys = (settings.input_key,) if settings.input_key in record else (settings.input_key, *CONVERSATION_KEYS)
    return next((k for k in keys if isinstance(record.get(k), list)), None)


def alpaca(record, settings: TokenSettings, tokenizer, where: str):
    """`instruction` + optional `input` → `output`; recognized when `input_key` is left at `input` or set to
    `instruction`."""
    prompt = alpaca_prompt(record, settings, where)
    return None if prompt is None else _prompt_response(prompt, record, settings, tokenizer, where)


def alpaca_prompt(record, settings: TokenSettings, where: str) -> str | None:
    """An Alpaca record's prompt (`instruction`, then `input` after a blank line when there is one); None for a
    record of another layout."""
    if not (isinstance(record, dict) and "instruction" in record and settings.input_key in ("input", "instruction")):
        return None
    prompt = _field(record, "instruction", where)
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: key 'input' must be a string, got {type(extra).__name__}")
    return f"{prompt}\n\n{extra}" if extra.strip() else prompt


def prompt_response(record, settings: TokenSettings, tokenizer, where: str):
    """A prompt under `input_key` and its response under `output_key`: the layout every record is tried as last."""
    return _prompt_response(_field(record, settings.input_key, where), record, settings, tokenizer, where)


def _prompt_response(prompt: str, record, settings: TokenSettings, tokenizer, where: str) -> tuple[Sample, bool]:
    response = _field(record, settings.output_key, where)
    if not response.strip():
        raise DataError(f"{where}: key '{settings.output_key}' is empty; a response is needed to train on")
    prompt_ids, response_ids = tokenize_pair(prompt, response, settings, tokenizer, where)
    prompt_ids, response_ids, cut = truncate(prompt_ids, response_ids, settings.max_len)
    return make_sample(prompt_ids, response_ids), cut


RECORD_LAYOUTS: tuple[Layout, ...] = (pretrain_text, conversation, alpaca, prompt_response)


def record_to_sample(record: object, settings: TokenSettings, tokenizer, where: str) -> tuple[Sample, bool]:
    """One record in any supported layout → (sample, truncated?). Raises DataError naming where and which key."""
    for layout in RECORD_LAYOUTS:
        made = layout(record, settings, tokenizer, where)
        if made is not None:
            return made
    raise AssertionError("prompt_response accepts every record")
