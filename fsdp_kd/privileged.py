"""Self-distillation with privileged context: the teacher reads each sample with text the student never sees, and the
student learns to answer as if it had read it (context distillation, OPSD, SDFT).

What the teacher sees besides the student's view (`TeacherContext`):
- `teacher_context_key`: a field of each record, put before the prompt (`CONTEXT_SEPARATOR` between them; with a
  chat template, at the start of the first user turn);
- `teacher_system_prompt`: a system turn first (with a chat template only; a conversation's own system turn follows
  it in the same turn).

The teacher's rendering of a record is its own token rows (`teacher_record`, rendered by `records` as any record is,
with the run's tokenizer and template), and its trained tokens are the student's own, one to one: the student's
trained spans are matched to the teacher's from the last one back (`matched_positions`), so a student sample cut by
max_len is matched where its tokens are. They are stored as a cross-tokenizer teacher's columns (its ids, and groups
of the alignment, `cross_tokenizer.Alignment`): one group per trained token, one token on each side, and one group
for the prompt (the two prompts, of different lengths) before each span. The data layer, the collate and the loss
then read them as they read any teacher's own token rows (`MicroBatch.teacher`). The teacher keeps its whole prompt,
context included: its rows may be longer than max_len (by the context, and in a conversation cut from the left by the
turns the cut dropped).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .cross_tokenizer import teacher_fields
from .errors import ConfigError
from .records import (IGNORE_INDEX, SHAREGPT_ROLES, DataError, Sample, TokenSettings, _field, alpaca_prompt,
                      conversation_key, record_to_sample)
from .tokenized import spans_of

CONTEXT_SEPARATOR = "\n\n"
RENDERING_VERSION = 1  # bump when the teacher's rendering changes: the tokenized data's key holds it
_UNBOUNDED = 1 << 30  # the teacher's rendering is not cut: its trained tokens are matched to the student's kept ones


@dataclass(frozen=True)
class TeacherContext:
    """What the teacher reads that the student does not; none of it set: the teacher reads the student's view."""
    context_key: str | None
    system_prompt: str | None

    @classmethod
    def of(cls, cfg) -> TeacherContext:
        return cls(cfg.teacher_context_key, cfg.teacher_system_prompt)

    def __bool__(self) -> bool:
        return self.context_key is not None or self.system_prompt is not None

    def describe(self) -> str:
        seen = [f"the record's '{self.context_key}' before the prompt"] if self.context_key is not None else []
        seen += ["a system prompt of its own"] if self.system_prompt is not None else []
        return f"privileged context: the teacher reads {' and '.join(seen)}; the student the prompt alone"

    @property
    def rendering(self) -> tuple:
        """What the teacher reads besides the sample's text: part of the tokenized data's key and a cache's meta."""
        return "privileged", RENDERING_VERSION, self.context_key, self.system_prompt

    def check_template(self, tokenizer, pretrain: str) -> None:
        """Refuses a teacher_system_prompt that the chat template cannot place (a template without a system role,
        which raises or drops it), before any model loads."""
        if self.system_prompt is None:
            return
        mark = "fsdp-kd teacher system prompt"
        try:
            turns = [{"role": "system", "content": mark}, {"role": "user", "content": "q"}]
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            why = "drops a system turn"
        except Exception as e:  # noqa: BLE001 - a template refuses in its own words (jinja's TemplateError, ...)
            text, why = "", f"refuses a system turn: {e}"
        if mark not in text:
            raise ConfigError(f"key teacher_system_prompt: the chat template of {pretrain} {why}; put the text in a "
                              "record field named by teacher_context_key instead, or give a template with a system "
                              "role (tokenizer_chat_template)", "teacher_system_prompt")


@dataclass(frozen=True)
class PrivilegedTokenization:
    """The teacher's token rows of each sample, with its context, in the columns a teacher of its own tokenizer
    stores (`tokenized.TEACHER_COLUMNS`); `tokenizer` is the run's, which renders both views."""
    context: TeacherContext
    tokenizer: object
    max_positions = None  # not cut at the teacher's max_position_embeddings (its rows are the sample's and the context)

    @property
    def rendering(self) -> tuple:
        return self.context.rendering

    def record_columns(self, record, sample: Sample, settings: TokenSettings,
                       where: str) -> tuple[list[int], list[int], list[int], list[int]]:
        """(teacher ids, student group ends, teacher group ends, special groups) of the student's `sample` of
        `record`; every group is one token a side or the prompts', so none is a span (`Alignment.spans`)."""
        teacher = record_to_sample(teacher_record(record, settings, self.context, where),
                                   dataclasses.replace(settings, max_len=_UNBOUNDED), self.tokenizer, where)[0]
        s_pos, t_pos = matched_positions(sample, teacher, where)
        return (teacher.input_ids[:int(t_pos[-1]) + 2], *group_ends(s_pos, t_pos), [])

    def rewritten(self, original: Sample, sample: Sample) -> dict[str, list[int]]:
        """The teacher fields of `sample`, `original`'s prompt with a new response (on-policy): the teacher's own
        prompt of `original` (up to the position matched with the end of the student's prompt), then the response."""
        s_pos = np.flatnonzero(np.asarray(sample.targets) != IGNORE_INDEX)
        start = int(s_pos[0])  # the prompt's last position, which predicts the response's first token
        end = original.teacher_positions[start]
        t_pos = end + (s_pos - start)
        teacher_ids = original.teacher_ids[:end + 1] + sample.input_ids[start + 1:]
        return teacher_fields(teacher_ids, *group_ends(s_pos, t_pos), [], len(sample.input_ids))


def teacher_record(record, settings: TokenSettings, context: TeacherContext, where: str) -> dict:
    """The record as the teacher reads it: the context before the prompt, the system prompt first. A prompt and
    response with a chat template become a conversation of those turns (rendered as `records.tokenize_pair` renders
    the pair), so that a system turn has a place."""
    extra = _context_text(record, context.context_key, where)
    key = conversation_key(record, settings)
    if key is not None:
        return {**record, key: _conversation_with(record[key], extra, context.system_prompt, key, where)}
    prompt = alpaca_prompt(record, settings, where)
    prompt = _field(record, settings.input_key, where) if prompt is None else prompt
    response = _field(record, settings.output_key, where)
    prompt = extra + CONTEXT_SEPARATOR + prompt if extra else prompt
    if not settings.apply_chat_template:
        return {settings.input_key: prompt, settings.output_key: response}
    system = [] if context.system_prompt is None else [{"role": "system", "content": context.system_prompt}]
    return {settings.input_key: [*system, {"role": "user", "content": prompt},
                                 {"role": "assistant", "content": response}]}


def _context_text(record, key: str | None, where: str) -> str:
    if key is None:
        return ""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing key '{key}' (teacher_context_key names the record field the teacher reads "
                        "before the prompt; give every record one, empty if it has none)")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: key '{key}' (teacher_context_key) must be a string, got "
                        f"{type(record[key]).__name__}")
    return record[key]


def _conversation_with(turns: list, extra: str, system: str | None, key: str, where: str) -> list:
    """A conversation's turns with the context at the start of the first user turn and the system prompt first."""
    turns = [dict(turn) if isinstance(turn, dict) else turn for turn in turns]

    def role(turn) -> str | None:  # OpenAI's role/content or ShareGPT's from/value, as `records` reads them
        return turn.get("role", SHAREGPT_ROLES.get(turn.get("from"))) if isinstance(turn, dict) else None

    def text(turn) -> str:
        return "content" if "role" in turn else "value"

    if extra:
        user = next((turn for turn in turns if role(turn) == "user"), None)
        if user is None or not isinstance(user.get(text(user)), str):
            raise DataError(f"{where}: key '{key}' has no user turn to put the teacher's context (teacher_context_key) "
                            "before")
        user[text(user)] = extra + CONTEXT_SEPARATOR + user[text(user)]
    if system is not None:
        if turns and role(turns[0]) == "system" and isinstance(turns[0].get(text(turns[0])), str):
            turns[0][text(turns[0])] = system + CONTEXT_SEPARATOR + turns[0][text(turns[0])]
        else:
            turns.insert(0, {"role": "system", "content": system})
    return turns


def matched_positions(student: Sample, teacher: Sample, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(student positions, teacher positions) that predict the same response token, one to one, for every trained
    position of the student. The spans are matched from the last one back: the last is matched from its start (a
    cut response keeps its start), the ones before it from their ends (a conversation cut from the left keeps the
    later turns whole). The tokens must agree, else the teacher's rendering changed the response: refused."""
    s_flat, t_flat = spans_of(student), spans_of(teacher)
    s_spans, t_spans = list(zip(s_flat[::2], s_flat[1::2])), list(zip(t_flat[::2], t_flat[1::2]))
    s_pos, t_pos = [], []
    for k, ((s0, s1), (t0, t1)) in enumerate(zip(reversed(s_spans), reversed(t_spans))):
        n = s1 - s0
        if n > t1 - t0:
            break
        s_pos.append(np.arange(s0, s1))
        t_pos.append(np.arange(t0, t0 + n) if k == 0 else np.arange(t1 - n, t1))
    s_pos = np.concatenate(s_pos[::-1]) if s_pos else np.zeros(0, np.int64)
    t_pos = np.concatenate(t_pos[::-1]) if t_pos else np.zeros(0, np.int64)
    s_targets, t_targets = np.asarray(student.targets), np.asarray(teacher.targets)
    if len(s_spans) > len(t_spans) or len(s_pos) != sum(b - a for a, b in s_spans) or not np.array_equal(
            s_targets[s_pos], t_targets[t_pos]):
        raise DataError(f"{where}: the teacher's rendering (with teacher_context_key/teacher_system_prompt) trains "
                        "other tokens than the student's, so they cannot be matched one to one; check that the chat "
                        "template renders an assistant turn alike whatever comes before it")
    return s_pos, t_pos


def group_ends(s_pos: np.ndarray, t_pos: np.ndarray) -> tuple[list[int], list[int]]:
    """Each side's group ends (`cross_tokenizer.Alignment`) for matched positions: student position p predicts the
    token p + 1 that teacher position q predicts as q + 1, so tokens p + 1 and q + 1 are a group of one token each;
    the tokens before each run of matches (the two prompts, or a turn between two trained spans) are one group."""
    s_ends, t_ends = [], []
    for p, q in zip(s_pos.tolist(), t_pos.tolist()):
        if not s_ends or (s_ends[-1], t_ends[-1]) != (p + 1, q + 1):
            s_ends.append(p + 1)
            t_ends.append(q + 1)
        s_ends.append(p + 2)
        t_ends.append(q + 2)
    return s_ends, t_ends
