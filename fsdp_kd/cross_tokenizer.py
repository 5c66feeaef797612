"""Two tokenizers over the same text: what each token spells in bytes, which tokens of the two vocabularies are the
same string, and which runs of tokens on each side cover the same bytes of a sample.

Cross-tokenizer distillation (issue 23) compares a teacher and a student that cut the text differently. Everything
here is string work done once: per tokenizer (`TokenBytes`, the id map `shared_vocabulary`) and per sample
(`align`), so that training only reads integers.

- A token's bytes follow its tokenizer's own decoder: byte-level BPE (GPT-2, Qwen, SmolLM) spells bytes in its
  printable byte alphabet ("Ġ" is a space); SentencePiece-style vocabularies (Llama, Phi-3) write a space as "▁" and
  unknown bytes as "<0xHH>" tokens; a special or added token spells its own content. Two tokens are the same string
  when they spell the same bytes, whatever each vocabulary's notation.
- A template's control token that the two vocabularies spell differently is mapped by its role (`ROLES`: the end of
  a turn, Phi-3's `<|end|>` and ChatML's `<|im_end|>`): the student's is the teacher's, in the id map and in the
  teacher's tokens of a sample, where it stands for the student's bytes.
- An alignment cuts a sample where both tokenizations have a token boundary at the same byte. Each group between two
  such cuts holds one or more consecutive tokens on each side, covering the same bytes (`Alignment`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import ClassVar

import numpy as np

from .tokenizer_compat import end_of_turn_id

ALIGNMENT_VERSION = 4  # bump when what `TeacherTokenization.columns` stores changes: the tokenized data's key holds it
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPACE_MARK = "\u2581"  # SentencePiece's "▁"
# why a student position has no teacher position: its negative value in `teacher_fields`, as metrics.jsonl counts them
LEFT_OUT = {-1: "multi_token_group",  # in a group of several tokens on a side that the span term does not teach
            -2: "past_teacher_tokens",  # past the teacher's last position (its max_position_embeddings; a cut end)
            -3: "unaligned_sample"}  # its sample got no teacher tokens at all (`TeacherTokenization.columns`)
PAST_TEACHER_TOKENS, UNALIGNED_SAMPLE = -2, -3
# a template's control tokens by role: how to read each from a tokenizer (an id, or None when it has none)
ROLES = {"end of turn": end_of_turn_id}


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (`bytes_to_unicode`), inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@dataclass(frozen=True)
class TokenBytes:
    """What every id of a tokenizer spells, in bytes, under that tokenizer's decoder; `regular[i]` is False for a
    special or added token and for a byte-fallback token ("<0xHH>"), which spell bytes that a regular token of the
    vocabulary may spell too."""
    spelled: tuple[bytes, ...]
    regular: tuple[bool, ...]
    kind: str  # "byte_level" or "sentencepiece": how the vocabulary writes bytes
    prefix_space: bool  # the tokenizer puts a space before the text (SentencePiece's dummy prefix)
    normalizer_forms: tuple[str, ...] = ()  # the Unicode normal forms its normalizer applies (Qwen's NFC)
    added: frozenset[int] = frozenset()  # its added (special or control) tokens: a chat template's markers, BOS
    roles: dict[str, int] = field(default_factory=dict)  # its control tokens by role (`ROLES`), those it has

    @classmethod
    def of(cls, tokenizer) -> TokenBytes:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())  # ~1 s for a 150k vocabulary: read it once
        kind = "byte_level" if "ByteLevel" in json.dumps(spec.get("decoder")) else "sentencepiece"
        prefix_space = _adds_prefix_space(spec)
        normalizer = json.dumps(spec.get("normalizer"))
        forms = tuple(form for form in ("NFKC", "NFKD", "NFC", "NFD") if f'"type": "{form}"' in normalizer)
        added = {token.content for token in tokenizer.added_tokens_decoder.values()}
        alphabet = _byte_level_alphabet()
        spelled, regular = [], []
        for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
            token = token or ""
            if token in added:
                spelled.append(token.encode())
                regular.append(False)
            elif kind == "byte_level":
                spelled.append(bytes(alphabet[c] for c in token) if all(c in alphabet for c in token)
                               else token.encode())
                regular.append(True)
            elif (fallback := _BYTE_FALLBACK.match(token)) is not None:
                spelled.append(bytes([int(fallback.group(1), 16)]))
                regular.append(False)
            else:
                spelled.append(token.replace(SPACE_MARK, " ").encode())
                regular.append(True)
        added_ids = frozenset(tokenizer.added_tokens_decoder)
        roles = {role: i for role, read in ROLES.items() if (i := read(tokenizer)) is not None}
        return cls(tuple(spelled), tuple(regular), kind, prefix_space, forms, added_ids, roles)

    def __len__(self) -> int:
        return len(self.spelled)


def _adds_prefix_space(spec: dict) -> bool:
    """Whether the pre-tokenizer puts a "▁" before the text (Metaspace with prepend_scheme "first"/"always", or the
    older add_prefix_space), as Llama and Phi-3 do; byte-level BPE here never does (its add_prefix_space is off in
    every tokenizer we read, and then a leading space is part of the text)."""
    text = json.dumps(spec.get("pre_tokenizer"), ensure_ascii=False) + json.dumps(spec.get("normalizer"),
                                                                                  ensure_ascii=False)
    if '"Metaspace"' in text:
        return '"prepend_scheme": "never"' not in text and '"add_prefix_space": false' not in text
    return '"Prepend"' in text and SPACE_MARK in text


# ---------------------------------------------------------------------------------------------------- the id map
def role_pairs(student: TokenBytes, teacher: TokenBytes) -> dict[str, tuple[int, int]]:
    """{role: (student id, teacher id)} for each control token both tokenizers have (`ROLES`: the end of a turn) that
    no token of the other vocabulary spells alike: the student's is the teacher's, so the teacher's own "stop here"
    stands for the student's. A token the other side spells too keeps that pair (`shared_vocabulary`), so the id map
    stays one to one, and a tokenizer against itself maps nothing by role."""
    return {role: (student.roles[role], teacher.roles[role]) for role in ROLES
            if role in student.roles and role in teacher.roles
            and student.spelled[student.roles[role]] not in teacher.spelled
            and teacher.spelled[teacher.roles[role]] not in student.spelled}


@dataclass(frozen=True)
class SharedVocabulary:
    """The tokens both vocabularies spell identically: `student_ids[j]` and `teacher_ids[j]` are the same string.
    Each string appears once; among several ids of one vocabulary spelling it, the regular one is kept. The control
    tokens mapped by role (`role_pairs`) are pairs too, and `by_role` names them."""
    student_ids: np.ndarray
    teacher_ids: np.ndarray
    student_size: int
    teacher_size: int
    by_role: tuple[str, ...] = ()  # "the end of turn: the student's <|end|> as the teacher's <|im_end|>"

    def describe(self) -> str:
        share = len(self.student_ids) / max(self.student_size, 1)
        roles = "".join(f"; by role, {role}" for role in self.by_role)
        return (f"{len(self.student_ids)} tokens map exactly between the vocabularies ({share:.1%} of the student's "
                f"{self.student_size}, {len(self.teacher_ids) / max(self.teacher_size, 1):.1%} of the teacher's "
                f"{self.teacher_size}){roles}")


def shared_vocabulary(student: TokenBytes, teacher: TokenBytes) -> SharedVocabulary:
    """The id map between two vocabularies by the bytes each token spells (`TokenBytes`), and the control tokens by
    role (`role_pairs`), which no token of the other side spells."""
    def by_spelling(vocab: TokenBytes) -> dict[bytes, int]:
        index: dict[bytes, int] = {}
        for i, (spelled, regular) in enumerate(zip(vocab.spelled, vocab.regular)):
            if spelled and (spelled not in index or (regular and not vocab.regular[index[spelled]])):
                index[spelled] = i
        return index

    s_index, t_index = by_spelling(student), by_spelling(teacher)
    roles = role_pairs(student, teacher)
    pairs = sorted([(s_index[b], t_index[b]) for b in s_index.keys() & t_index.keys()] + list(roles.values()))
    s_ids, t_ids = (np.array(ids, dtype=np.int64) for ids in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    by_role = tuple(f"the {role}: the student's {student.spelled[s].decode(errors='replace')} as the teacher's "
                    f"{teacher.spelled[t].decode(errors='replace')}" for role, (s, t) in roles.items())
    return SharedVocabulary(s_ids, t_ids, len(student), len(teacher), by_role)


# ---------------------------------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Alignment:
    """One sample's groups: group g holds student tokens [student_ends[g-1], student_ends[g]) and teacher tokens
    [teacher_ends[g-1], teacher_ends[g]) (from 0 for g = 0), which spell the same bytes. A group has at least one
    token on each side, but for a side's tokens that spell nothing (a lone dummy-prefix "▁"), which join the group
    after them."""
    student_ends: np.ndarray
    teacher_ends: np.ndarray

    @property
    def groups(self) -> int:
        return len(self.student_ends)

    def one_to_one(self) -> np.ndarray:
        """[groups] bool: the groups of exactly one token on each side."""
        s = np.diff(self.student_ends, prepend=0)
        t = np.diff(self.teacher_ends, prepend=0)
        return (s == 1) & (t == 1)

    def teacher_positions(self, student_length: int) -> np.ndarray:
        """[student_length]: for each student position p, the teacher position that predicts the same token as p
        does (p predicts student token p + 1), or -1. Only one-to-one groups give one: student token i alone in its
        group with teacher token j is predicted by student position i - 1 and teacher position j - 1, after
        contexts that cover the same bytes (the groups before)."""
        one = self.one_to_one()
        i, j = self.student_ends[one] - 1, self.teacher_ends[one] - 1
        keep = (i >= 1) & (j >= 1)
        out = np.full(student_length, -1, dtype=np.int64)
        out[i[keep] - 1] = j[keep] - 1
        return out

    def spans(self, opaque=()) -> np.ndarray:
        """[k, 4]: per group of several tokens on a side, the student positions [s0, s1) and teacher positions
        [t0, t1) that predict its tokens (position p predicts token p + 1), so that each side's probability of the
        group's text is the product of its probabilities there (the span term, `cross_vocab`). Left out: one-to-one
        groups (the bucket term teaches them), a group whose first token on either side has no position before it,
        and the groups listed in `opaque` (a special token on a side: not text the other side can spell)."""
        s_start, t_start = (np.concatenate([[0], ends])[:-1] for ends in (self.student_ends, self.teacher_ends))
        taught = ~self.one_to_one() & (s_start >= 1) & (t_start >= 1)
        taught &= (self.student_ends > s_start) & (self.teacher_ends > t_start)
        taught[np.asarray(opaque, dtype=np.int64)] = False
        return np.stack([s_start, self.student_ends, t_start, self.teacher_ends], 1)[taught] - 1


class AlignmentError(ValueError):
    """A tokenizer's tokens do not spell the text (its normalizer changed it), so bytes cannot be matched."""


def byte_ends(ids: list[int], vocab: TokenBytes, text: bytes, respelled: dict[int, bytes] | None = None) -> np.ndarray:
    """The byte offset in `text` where each token ends; the dummy prefix space, if the tokenizer added one, is not
    part of the text. The tokens at the places `respelled` holds spell its bytes instead of their own (a control
    token mapped by role: the other side's bytes it stands for). Raises AlignmentError when the tokens do not spell
    the text."""
    pieces = [vocab.spelled[i] for i in ids]
    for at, data in (respelled or {}).items():
        pieces[at] = data
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(ids))
    spelled = b"".join(pieces)
    skip = 0
    if spelled != text and vocab.prefix_space and spelled == b" " + text:
        skip = 1
    elif spelled != text:
        at = next((i for i, (a, b) in enumerate(zip(spelled, text)) if a != b), min(len(spelled), len(text)))
        raise AlignmentError(f"the tokens spell {spelled[max(0, at - 20):at + 20]!r} where the text has "
                             f"{text[max(0, at - 20):at + 20]!r} (byte {at})")
    return np.maximum(np.cumsum(lengths) - skip, 0)


def align(student_ids: list[int], teacher_ids: list[int], student: TokenBytes, teacher: TokenBytes,
          text: str, respelled: dict[int, bytes] | None = None) -> Alignment:
    """Groups of consecutive tokens that cover the same bytes of `text`, which both id lists tokenize (without
    special tokens added around it): cut wherever both sides end a token at the same byte. The student's tokens
    spell `text`, the teacher's what its normalizer makes of it (`normalized`: Qwen's NFC composes a decomposed
    accent), but for the teacher's tokens at the places in `respelled`, which stand for those bytes (`byte_ends`); a
    student token that ends inside a character the normalization changes is never a cut."""
    teacher_text = normalized(text, teacher)
    s_ends = byte_ends(student_ids, student, text.encode())
    t_ends = byte_ends(teacher_ids, teacher, teacher_text.encode(), respelled)
    if teacher_text != text:  # in half bytes of the teacher's text: see `normalized_ends`
        s_ends, t_ends = normalized_ends(text, teacher.normalizer_forms, s_ends), 2 * t_ends
    cuts = np.intersect1d(s_ends, t_ends)
    cuts = cuts[cuts > 0]  # a token that spells nothing at the start joins the first group
    # a token belongs to the first cut at or after its end; a group's last token is the last one that does
    s_group, t_group = np.searchsorted(cuts, s_ends), np.searchsorted(cuts, t_ends)
    return Alignment(np.searchsorted(s_group, np.arange(len(cuts)), side="right"),
                     np.searchsorted(t_group, np.arange(len(cuts)), side="right"))


def normalized_ends(text: str, forms: tuple[str, ...], ends: np.ndarray) -> np.ndarray:
    """Byte offsets into `text` as offsets into its normal form (under `forms`), doubled: an offset at the edge of a
    run of characters that normalizes on its own (a letter and its combining accents), or inside a run that it leaves
    as it is, maps to twice its place there; one inside a run that it changes, to the odd number just after twice the
    run's start, so it sorts inside the run and never equals a teacher's (even) end: no cut. Raises AlignmentError
    where the runs do not normalize apart."""
    runs, start = [], 0
    for i in range(1, len(text) + 1):  # a run starts at a character of combining class 0 (not a Hangul vowel/final)
        if i == len(text) or (unicodedata.combining(text[i]) == 0 and not 0x1160 <= ord(text[i]) <= 0x11FF):
            runs.append(text[start:i])
            start = i
    pieces = [normalized_as(run, forms) for run in runs]
    if "".join(pieces) != normalized_as(text, forms):
        raise AlignmentError("the text does not normalize run by run")
    raw = np.cumsum([0] + [len(run.encode()) for run in runs])
    norm = np.cumsum([0] + [len(piece.encode()) for piece in pieces])
    at = np.searchsorted(raw, ends, side="right") - 1  # the run each end is in (or starts)
    inside = ends - raw[at]
    same = np.array([run == piece for run, piece in zip(runs, pieces)] + [True])[at]
    return np.where((inside == 0) | same, 2 * (norm[at] + inside), 2 * norm[at] + 1)


def normalized_as(text: str, forms: tuple[str, ...]) -> str:
    """`text` under these Unicode normal forms, in order."""
    for form in forms:
        text = unicodedata.normalize(form, text)
    return text


def special_groups(groups: Alignment, student_ids, teacher_ids, student: TokenBytes, teacher: TokenBytes) -> list[int]:
    """The groups holding a special or added token on either side (a control token such as "<|end|>", whose
    content the other side may only spell as text): the span term leaves them out, since the two sides' tokens are
    not the same event there. A byte-fallback token ("<0x0A>", which `TokenBytes` also marks not regular) is text."""
    def special(vocab: TokenBytes, ids) -> np.ndarray:
        fallback = vocab.kind == "sentencepiece"
        return np.fromiter((not vocab.regular[i] and not (fallback and len(vocab.spelled[i]) == 1) for i in ids),
                           dtype=bool, count=len(ids))

    found = set()
    for ends, ids, vocab in ((groups.student_ends, student_ids, student), (groups.teacher_ends, teacher_ids, teacher)):
        at = np.flatnonzero(special(vocab, ids))
        found.update(np.searchsorted(ends, at, side="right").tolist())
    return sorted(g for g in found if g < groups.groups)


def normalized(text: str, *vocabularies: TokenBytes) -> str:
    """`text` as the tokenizers' Unicode normalizers (NFC, NFKC) make it before they cut it, so what their tokens
    spell; a tokenizer without one leaves it as is."""
    for vocab in vocabularies:
        text = normalized_as(text, vocab.normalizer_forms)
    return text


# ---------------------------------------------------------------------------------------------------- per sample
@dataclass
class TeacherTokenization:
    """The teacher's tokens of each student sample and their alignment, computed when the data is tokenized (the
    Arrow cache stores them) so that training does no string work.

    The text is what the student's tokens spell (`TokenBytes`), so the teacher reads the same rendered sample, chat
    template included, as its own tokenizer would cut it: its normalizer applied (`align` matches bytes through it),
    its BOS first when its tokenizer adds one, and each of the student's added tokens (a template's markers) as the
    teacher's token of the same content where it has one. Everything else is text: the runs between those tokens are
    tokenized with special tokens split, so a literal "<|im_end|>" in a student's text (a Phi-3 student's data) is
    text to the teacher too, never its end-of-turn token. A student's control token mapped by role (`role_pairs`:
    its end of turn) is the teacher's of that role, whatever the two spell. A sample whose text the teacher's tokens
    do not spell, or that truncation left without a whole character, gets no teacher tokens: it gets the CE term
    alone, and `columns` says so by returning empty lists."""
    student: TokenBytes
    teacher: TokenBytes
    tokenizer: object  # the teacher's (HF) tokenizer
    max_positions: int | None = None  # the teacher's max_position_embeddings: its tokens past it are cut off
    spans: bool = True  # whether samples lay out the groups of several tokens (`teacher_fields`): the span term on
    rendering: ClassVar[tuple] = ()  # what the teacher reads besides the sample's text: nothing (`privileged` adds)

    @cached_property
    def _encoders(self):
        """(the text at the start, the text after a special token): the teacher's tokenizer with special tokens split,
        the second without the dummy prefix a SentencePiece tokenizer puts only at the start of a sample."""
        from tokenizers import Tokenizer

        spec = json.loads(self.tokenizer.backend_tokenizer.to_str())
        first, after = Tokenizer.from_str(json.dumps(spec)), Tokenizer.from_str(json.dumps(_no_dummy_prefix(spec)))
        for encoder in (first, after):
            encoder.encode_special_tokens = True
        return first, after

    @cached_property
    def _markers(self) -> dict[int, int]:
        """{student id: teacher id}: each student added token that goes to the teacher as one token: one of the same
        content as the teacher's added token, a control token the two map by role (`role_pairs`) as the teacher's of
        that role."""
        by_content = {self.teacher.spelled[i]: i for i in sorted(self.teacher.added, reverse=True)}
        same = {i: by_content[self.student.spelled[i]] for i in self.student.added
                if self.student.spelled[i] in by_content}
        return same | dict(role_pairs(self.student, self.teacher).values())

    @cached_property
    def _bos(self) -> list[int]:
        """The ids the teacher's tokenizer puts before a text (its BOS), if any (an EOS it also puts after is not
        one: the sample's own text says where it ends)."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        ids = self.tokenizer("x")["input_ids"]
        return next((ids[:start] for start in range(len(ids) - len(plain) + 1)
                     if ids[start:start + len(plain)] == plain), [])

    def text(self, input_ids: list[int]) -> tuple[str, int, int] | None:
        """(text, a, b): what the student's tokens [a, b) spell, the run without the tokens at either end that hold
        only part of a UTF-8 character (where truncation cut one); None when no such run decodes."""
        spelled = [self.student.spelled[i] for i in input_ids]
        a, b = 0, len(spelled)
        while a < b and spelled[a][:1] and spelled[a][0] & 0xC0 == 0x80:  # starts inside a character
            a += 1
        data = b"".join(spelled[a:b])
        if a == 0 and self.student.prefix_space and data.startswith(b" "):
            data = data[1:]  # the student's dummy prefix, not part of the text
        for _ in range(4):  # a character is at most 4 bytes: drop the tokens of a cut one at the end
            if b == a:
                return None
            try:
                return data.decode("utf-8"), a, b
            except UnicodeDecodeError:
                b -= 1
                data = data[:len(data) - len(spelled[b])]
        return None

    def teacher_ids(self, student_ids: list[int], text: str) -> tuple[list[int], dict[int, bytes]]:
        """(the teacher's tokens of `text`, which `student_ids` spell; the places among them of the tokens that stand
        for student tokens of other bytes, and those bytes): each student added token in `_markers` as its teacher
        token, the text between them through `_encoders` (without the BOS)."""
        data = text.encode()
        ends = byte_ends(student_ids, self.student, data)
        out, respelled, start = [], {}, 0
        for k, token in enumerate(student_ids):
            special = self._markers.get(token)
            if special is None:
                continue
            begin = int(ends[k - 1]) if k else 0
            out += self._text_ids(data[start:begin], start)
            if self.teacher.spelled[special] != data[begin:ends[k]]:
                respelled[len(out)] = data[begin:ends[k]]
            out.append(special)
            start = int(ends[k])
        return out + self._text_ids(data[start:], start), respelled

    def _text_ids(self, data: bytes, at: int) -> list[int]:
        if not data:
            return []
        return self._encoders[0 if at == 0 else 1].encode(data.decode("utf-8"), add_special_tokens=False).ids

    def fields(self, input_ids: list[int]) -> dict[str, list[int]]:
        """The teacher's `records.Sample` fields of a sample with these ids, computed now: for a sample that was
        not in the tokenized data (an on-policy response, re-tokenized at step time)."""
        return teacher_fields(*self.columns(input_ids), len(input_ids), self.spans)

    def record_columns(self, record, sample, settings, where: str) -> tuple[list[int], ...]:
        """`columns` of a sample as the data is tokenized: the teacher reads the sample's text alone."""
        return self.columns(sample.input_ids)

    def rewritten(self, original, sample) -> dict[str, list]:
        """`fields` of `sample`, `original` with a new response (on-policy): its text alone again."""
        return self.fields(sample.input_ids)

    def columns(self, input_ids: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
        """(teacher ids, student group ends, teacher group ends, special groups) of one sample; empty lists when the
        two tokenizations cannot be aligned. Tokens cut from a character at either end are left out of the groups, so
        their positions get no teacher; the teacher's BOS joins the first group. A sample longer in the teacher's
        tokens than its `max_positions` keeps the groups that end within them (`LEFT_OUT` counts the rest)."""
        run = self.text(input_ids)
        if run is None:
            return [], [], [], []
        text, a, b = run
        try:
            teacher_ids, respelled = self.teacher_ids(input_ids[a:b], text)
            groups = align(input_ids[a:b], teacher_ids, self.student, self.teacher, text, respelled)
        except AlignmentError:
            return [], [], [], []
        special = special_groups(groups, input_ids[a:b], teacher_ids, self.student, self.teacher)
        bos = self._bos if teacher_ids[:len(self._bos)] != self._bos else []
        teacher_ids, s_ends, t_ends = bos + teacher_ids, groups.student_ends + a, groups.teacher_ends + len(bos)
        if self.max_positions is not None and len(teacher_ids) > self.max_positions:
            within = t_ends <= self.max_positions
            if not within.any():
                return [], [], [], []
            s_ends, t_ends = s_ends[within], t_ends[within]
            teacher_ids, special = teacher_ids[:int(t_ends[-1])], [g for g in special if g < len(t_ends)]
        return teacher_ids, s_ends.tolist(), t_ends.tolist(), special


def _no_dummy_prefix(node):
    """A tokenizer spec (its JSON) that puts no dummy prefix "▁" before the text: Metaspace's prepend scheme
    "never", and no Prepend normalizer (`_adds_prefix_space` reads the same two)."""
    if isinstance(node, list):
        return [_no_dummy_prefix(n) for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
    if not isinstance(node, dict):
        return node
    node = {key: _no_dummy_prefix(value) for key, value in node.items()}
    if node.get("type") == "Metaspace":
        node.update({"prepend_scheme": "never"} if "prepend_scheme" in node else {"add_prefix_space": False})
    return node


def teacher_fields(teacher_ids: list[int], student_ends, teacher_ends, special, length: int,
                   spans: bool = True) -> dict[str, list]:
    """A sample's teacher fields (`records.Sample.teacher_ids`, `teacher_positions`, `teacher_spans`) from its stored
    columns; a position without a teacher position holds why (a `LEFT_OUT` key). Without `spans` (the span term off,
    `span_weight 0`) the groups of several tokens are laid out as no span: their tokens are left out, counted as
    such, as every other token without a KD term."""
    groups = Alignment(np.asarray(student_ends, dtype=np.int64), np.asarray(teacher_ends, dtype=np.int64))
    positions = groups.teacher_positions(length)
    if not len(teacher_ids):
        positions[:] = UNALIGNED_SAMPLE
    elif groups.groups:
        positions[max(int(groups.student_ends[-1]) - 1, 0):] = PAST_TEACHER_TOKENS  # they predict tokens past it
    return {"teacher_ids": list(teacher_ids), "teacher_positions": positions.tolist(),
            "teacher_spans": [tuple(span) for span in groups.spans(special).tolist()] if spans else []}


def span_taught(spans, trained: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The groups of `spans` (`Sample.teacher_spans`) that the span term teaches: those whose student positions are
    all trained (a group that starts in the prompt has no student row for its first tokens)."""
    return [span for span in spans or () if trained[span[0]:span[1]].all()]


def in_spans(spans, length: int) -> np.ndarray:
    """[length] bool: the student positions in these groups."""
    mask = np.zeros(length, dtype=bool)
    for s0, s1, _, _ in spans:
        mask[s0:s1] = True
    return mask
