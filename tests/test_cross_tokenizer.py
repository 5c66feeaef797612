"""Two tokenizers over the same text (`fsdp_kd/cross_tokenizer.py`): token bytes, the id map and the alignment, on
the real tokenizers (Qwen2.5, Phi-3, SmolLM) and real SFT text (GSM8K, ShareGPT), and on hand-made edge cases."""

import itertools
import json

import numpy as np
import pytest

from assets import real_asset
from fsdp_kd.cross_tokenizer import (Alignment, AlignmentError, TeacherTokenization, TokenBytes, _adds_prefix_space,
                                     align, byte_ends, normalized, role_pairs, shared_vocabulary, special_groups)

TOKENIZERS = ("tok_qwen2.5_instruct", "tok_phi3_mini_instruct", "tok_smollm_360m_instruct")
EDGE_TEXTS = ["", " ", "x", "  leading spaces", "trailing  ", "Hello  world,\n naïve 日本 😀 x\t\ttabs",
              "<|im_start|>user\nhi<|im_end|>", "a\u0301 e\u0301 (combining accents)", "ﬁ ligature ①"]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    loaded = {name: AutoTokenizer.from_pretrained(real_asset(name)) for name in TOKENIZERS}
    return {name: (tok, TokenBytes.of(tok)) for name, tok in loaded.items()}


@pytest.fixture(scope="module")
def texts():
    gsm8k = [json.loads(line) for line in itertools.islice(open(real_asset("gsm8k/train.jsonl")), 150)]
    sharegpt = json.load(open(real_asset("fastchat/dummy_conversation.json")))[:60]
    return ([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm8k]
            + [turn["value"] for conv in sharegpt for turn in conv["conversations"]] + EDGE_TEXTS)


def spell(vocab: TokenBytes, ids) -> bytes:
    return b"".join(vocab.spelled[i] for i in ids)


def role_spellings(student: TokenBytes, teacher: TokenBytes) -> dict[int, bytes]:
    """{teacher id: the student's bytes it stands for}: the control tokens mapped by role (`role_pairs`, which scans
    a vocabulary: read it once per pair, not per position)."""
    return {t: student.spelled[s] for s, t in role_pairs(student, teacher).values()}


def spell_for(teacher: TokenBytes, as_student: dict[int, bytes], ids) -> bytes:
    """What the teacher's tokens stand for in the student's text: its control tokens mapped by role spell the
    student's tokens of that role (`role_spellings`), the others their own bytes."""
    return b"".join(as_student.get(i, teacher.spelled[i]) for i in ids)


def test_every_tokenization_spells_its_text(tokenizers, texts):
    """Token bytes follow each tokenizer's own decoder: the tokens of a text spell exactly its bytes (after the
    dummy prefix space a SentencePiece tokenizer puts first), so byte offsets are exact."""
    for name, (tok, vocab) in tokenizers.items():
        for text in texts:
            text = normalized(text, vocab)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ends = byte_ends(ids, vocab, text.encode())
            assert len(ends) == len(ids) and (len(ids) == 0 or ends[-1] == len(text.encode())), (name, text)
            assert np.all(np.diff(ends) >= 0)
            spelled = spell(vocab, ids)
            assert spelled == text.encode() or (vocab.prefix_space and spelled == b" " + text.encode())


@pytest.mark.parametrize("pair", list(itertools.combinations(TOKENIZERS, 2)))
def test_every_group_covers_the_same_bytes_on_both_sides(tokenizers, texts, pair):
    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers[pair[0]], tokenizers[pair[1]]
    groups = one_to_one = 0
    for text in texts:
        text = normalized(text, s_vocab, t_vocab)
        s_ids = s_tok(text, add_special_tokens=False)["input_ids"]
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
        al = align(s_ids, t_ids, s_vocab, t_vocab, text)
        s_byte_ends, t_byte_ends = byte_ends(s_ids, s_vocab, text.encode()), byte_ends(t_ids, t_vocab, text.encode())
        assert al.student_ends[-1:].tolist() == ([len(s_ids)] if s_ids else [])
        assert al.teacher_ends[-1:].tolist() == ([len(t_ids)] if t_ids else [])
        s_start = t_start = 0
        covered = b""
        for s_end, t_end in zip(al.student_ends, al.teacher_ends):
            assert s_end > s_start or t_end > t_start
            s_bytes, t_bytes = byte_span(s_byte_ends, s_start, s_end), byte_span(t_byte_ends, t_start, t_end)
            assert s_bytes == t_bytes and s_bytes[0] == len(covered), (text, s_bytes, t_bytes)
            covered = text.encode()[:s_bytes[1]]
            s_start, t_start = s_end, t_end
        assert covered == text.encode()
        groups += al.groups
        one_to_one += int(al.one_to_one().sum())
    assert groups > 5000
    print(f"{pair}: {groups} groups, {one_to_one / groups:.1%} one token on each side")


def byte_span(ends, start, end) -> tuple[int, int]:
    """The bytes that tokens [start, end) cover, from every token's end byte: (first byte, end byte)."""
    return (int(ends[start - 1]) if start else 0), int(ends[end - 1])


@pytest.mark.parametrize("pair", list(itertools.combinations(TOKENIZERS, 2)))
def test_the_id_map_joins_every_string_both_vocabularies_spell(tokenizers, pair):
    """Each pair spells the same bytes but the control tokens mapped by role (the templates' ends of turn), each byte
    string is mapped once, and no string that both vocabularies hold as a regular token is left out."""
    (_, s_vocab), (_, t_vocab) = tokenizers[pair[0]], tokenizers[pair[1]]
    shared = shared_vocabulary(s_vocab, t_vocab)
    by_role = set(role_pairs(s_vocab, t_vocab).values())  # Phi-3's end of turn and ChatML's; ChatML's alike
    assert len(by_role) == ("tok_phi3_mini_instruct" in pair)
    assert by_role <= set(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    for s, t in zip(shared.student_ids, shared.teacher_ids):
        assert s_vocab.spelled[s] == t_vocab.spelled[t] or (s, t) in by_role
    assert len(set(shared.student_ids.tolist())) == len(shared.student_ids)
    assert len(set(shared.teacher_ids.tolist())) == len(shared.teacher_ids)
    s_regular = {b for b, r in zip(s_vocab.spelled, s_vocab.regular) if r and b}
    t_regular = {b for b, r in zip(t_vocab.spelled, t_vocab.regular) if r and b}
    mapped = {s_vocab.spelled[s] for s in shared.student_ids}
    assert s_regular & t_regular <= mapped
    assert len(shared.student_ids) > 10000  # these vocabularies share most common English pieces
    print(shared.describe())


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_vocabulary_with_itself_maps_every_regular_token_to_itself(tokenizers, name):
    """Its end of turn too, to itself: nothing is mapped by role that is not mapped by spelling."""
    _, vocab = tokenizers[name]
    shared = shared_vocabulary(vocab, vocab)
    assert np.array_equal(shared.student_ids, shared.teacher_ids)
    assert len(shared.student_ids) == len(set(vocab.spelled) - {b""}) and shared.by_role == ()
    assert vocab.roles["end of turn"] in shared.student_ids


def test_the_same_tokenizer_gives_one_group_per_token(tokenizers, texts):
    tok, vocab = tokenizers["tok_qwen2.5_instruct"]
    for text in texts[:50]:
        text = normalized(text, vocab)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        al = align(ids, ids, vocab, vocab, text)
        assert al.student_ends.tolist() == list(range(1, len(ids) + 1)) == al.teacher_ends.tolist()


def test_groups_from_hand_made_byte_lengths():
    """Student "ab|c|de", teacher "a|bcd|e": the only common inner cut is none, so one group; with "ab|cde" against
    "a|b|cde" the cut after "ab" is shared."""
    vocab = TokenBytes((b"ab", b"c", b"de", b"a", b"bcd", b"e", b"b", b"cde"), (True,) * 8, "byte_level", False)
    assert _ends(align([0, 1, 2], [3, 4, 5], vocab, vocab, "abcde")) == ([3], [3])
    assert _ends(align([0, 7], [3, 6, 7], vocab, vocab, "abcde")) == ([1, 2], [2, 3])
    assert _ends(align([], [], vocab, vocab, "")) == ([], [])
    with pytest.raises(AlignmentError, match="byte 2"):
        align([0, 1], [3, 4], vocab, vocab, "abXd")


def _ends(al: Alignment) -> tuple[list[int], list[int]]:
    return al.student_ends.tolist(), al.teacher_ends.tolist()


@pytest.mark.parametrize("spec,adds", [
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}, True),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"}}, False),
    # a legacy Llama-2 / Mistral tokenizer.json: the normalizer prepends the mark
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                         {"type": "Replace", "pattern": {"String": " "},
                                                          "content": "\u2581"}]}, "pre_tokenizer": None}, True),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "normalizer": None}, False),
])
def test_the_dummy_prefix_space_is_read_off_the_tokenizer_spec(spec, adds):
    assert _adds_prefix_space(spec) is adds


@pytest.mark.parametrize("pair", list(itertools.permutations(TOKENIZERS, 2)))
def test_each_aligned_position_predicts_the_same_string_on_both_sides(tokenizers, texts, pair):
    """What the data stores per sample (`TeacherTokenization.columns`, read back as `teacher_positions`): where
    student position p has a teacher position, the token it predicts spells the same bytes as the teacher's token
    there, and both contexts before it spell the same bytes too. The student's ids are its own tokenization of the
    text, as the data pipeline gives them (special tokens included)."""
    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers[pair[0]], tokenizers[pair[1]]
    retokenize, as_student = TeacherTokenization(s_vocab, t_vocab, t_tok), role_spellings(s_vocab, t_vocab)
    aligned = positions = 0
    for text in texts:
        s_ids = s_tok(normalized(text, s_vocab, t_vocab), add_special_tokens=False)["input_ids"]
        t_ids, s_ends, t_ends, _ = retokenize.columns(s_ids)
        at = Alignment(np.asarray(s_ends, dtype=np.int64), np.asarray(t_ends, dtype=np.int64)).teacher_positions(
            len(s_ids))
        positions += max(len(s_ids) - 1, 0)
        for p, q in enumerate(at):
            if q < 0:
                continue
            aligned += 1
            predicted = spell_for(t_vocab, as_student, t_ids[q + 1:q + 2])
            assert spell(s_vocab, s_ids[p + 1:p + 2]) == predicted, (pair, text)
            s_context, t_context = spell(s_vocab, s_ids[:p + 1]), spell_for(t_vocab, as_student, t_ids[:q + 1])
            assert s_context.lstrip(b" ") == t_context.lstrip(b" ") or s_context == t_context, (pair, text)
    print(f"{pair[0]} -> {pair[1]}: {aligned / positions:.1%} of {positions} positions aligned one to one")
    assert aligned / positions > 0.8  # the tokenizers cut English and code alike most of the time


@pytest.mark.parametrize("pair", list(itertools.permutations(TOKENIZERS, 2)))
def test_each_span_is_the_same_text_after_the_same_context_on_both_sides(tokenizers, texts, pair):
    """What the span term reads (`Sample.teacher_spans`): the student tokens its student positions predict spell the
    same bytes as the teacher tokens its teacher positions predict, after contexts of the same bytes, and no span
    holds a special token. With the one-to-one positions they leave out only the first token, the groups of special
    tokens and what precedes a side's first position."""
    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers[pair[0]], tokenizers[pair[1]]
    retokenize, as_student = TeacherTokenization(s_vocab, t_vocab, t_tok), role_spellings(s_vocab, t_vocab)
    taught = positions = spans = 0
    for text in texts:
        s_ids = s_tok(normalized(text, s_vocab, t_vocab), add_special_tokens=False)["input_ids"]
        fields = retokenize.fields(s_ids)
        t_ids = fields["teacher_ids"]
        positions += max(len(s_ids) - 1, 0)
        taught += sum(q >= 0 for q in fields["teacher_positions"])
        for s0, s1, t0, t1 in fields["teacher_spans"]:
            spans += 1
            taught += s1 - s0
            assert s1 - s0 > 1 or t1 - t0 > 1
            s_text, t_text = spell(s_vocab, s_ids[s0 + 1:s1 + 1]), spell_for(t_vocab, as_student, t_ids[t0 + 1:t1 + 1])
            assert s_text == t_text, (pair, text)
            s_context, t_context = spell(s_vocab, s_ids[:s0 + 1]), spell_for(t_vocab, as_student, t_ids[:t0 + 1])
            assert s_context.lstrip(b" ") == t_context.lstrip(b" ") or s_context == t_context, (pair, text)
            assert all(s_vocab.regular[i] or s_vocab.kind == "sentencepiece" for i in s_ids[s0 + 1:s1 + 1])
            assert all(t_vocab.regular[i] or t_vocab.kind == "sentencepiece" for i in t_ids[t0 + 1:t1 + 1])
    print(f"{pair[0]} -> {pair[1]}: {spans} spans; {taught / positions:.1%} of {positions} positions taught")
    assert spans and taught / positions > 0.98


def test_a_group_with_a_special_token_gets_no_span():
    """A control token on one side against its content spelled as text on the other is not the same event: its
    group gets no span, while a group of several plain tokens does (by hand: student "ab" + "<e>", teacher "a" "b"
    "<" "e" ">", with "<e>" the student's special token)."""
    student = TokenBytes(spelled=(b"ab", b"<e>", b"c"), regular=(True, False, True), kind="byte_level",
                         prefix_space=False)
    teacher = TokenBytes(spelled=(b"a", b"b", b"<", b"e", b">", b"c"), regular=(True,) * 6, kind="byte_level",
                         prefix_space=False)
    groups = align([2, 0, 1, 2], [5, 0, 1, 2, 3, 4, 5], student, teacher, "cab<e>c")
    assert _ends(groups) == ([1, 2, 3, 4], [1, 3, 6, 7])
    special = special_groups(groups, [2, 0, 1, 2], [5, 0, 1, 2, 3, 4, 5], student, teacher)
    assert special == [2]
    assert groups.spans(special).tolist() == [[0, 1, 0, 2]]  # "ab": student position 0, teacher positions 0-1
    assert groups.spans().tolist() == [[0, 1, 0, 2], [1, 2, 2, 5]]


def test_tokens_cut_inside_a_character_are_left_out_not_the_sample(tokenizers):
    """Truncation can cut a UTF-8 character at either end of a sample: the tokens holding its part get no teacher,
    the rest of the sample aligns as usual (it used to lose its whole KD)."""
    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers["tok_smollm_360m_instruct"], tokenizers["tok_qwen2.5_instruct"]
    retokenize = TeacherTokenization(s_vocab, t_vocab, t_tok)
    ids = s_tok("日本 is Japan, and 日本語 is Japanese 日本", add_special_tokens=False)["input_ids"]
    whole = retokenize.fields(ids)["teacher_positions"]
    cut = [k for k in range(1, len(ids)) if spell(s_vocab, ids[:k]).decode("utf-8", errors="replace").endswith("�")]
    start = [k for k in range(1, len(ids)) if spell(s_vocab, ids[k:]).decode("utf-8", errors="replace")[0] == "�"]
    assert cut and start  # the tokenizer splits these characters across tokens
    for ids_cut, offset in ((ids[:cut[-1]], 0), (ids[start[0]:], start[0])):
        positions = retokenize.fields(ids_cut)["teacher_positions"]
        assert sum(p >= 0 for p in positions) >= sum(p >= 0 for p in whole) - 6  # only the cut characters lost
        fields = retokenize.fields(ids_cut)
        for p, q in enumerate(positions):
            if q >= 0:
                assert spell(s_vocab, ids_cut[p + 1:p + 2]) == spell(t_vocab, fields["teacher_ids"][q + 1:q + 2])


def test_a_sample_no_run_of_which_decodes_gets_no_teacher_tokens():
    """A sample of nothing but a cut character decodes to no text: no teacher tokens, CE term alone, no failure."""
    vocab = TokenBytes(spelled=(b"a", "é".encode()[:1], "é".encode()[1:]), regular=(True, True, True),
                       kind="byte_level", prefix_space=False)
    retokenize = TeacherTokenization(vocab, vocab, tokenizer=None)
    assert retokenize.text([1]) is None and retokenize.text([2]) is None
    assert retokenize.columns([1]) == ([], [], [], [])
    assert retokenize.text([0, 1]) == ("a", 0, 1)


def byte_tokenizer(normalize: bool = False, bos: bool = False, eos: bool = False):
    """A tiny byte-level tokenizer (one token per byte, no merges) with ChatML's markers as special tokens; with
    `normalize`, Qwen's NFC normalizer, with `bos`, a BOS that it puts before every text (as Llama-3's does), and
    with `eos` an EOS after it too."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    if normalize:
        core.normalizer = normalizers.NFC()
    specials = ["<|im_start|>", "<|im_end|>"] + (["<s>", "</s>"] if bos else [])
    core.add_special_tokens(specials)
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A </s>" if eos else "<s> $A", special_tokens=[
            ("<s>", core.token_to_id("<s>")), ("</s>", core.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>" if bos else None)


def kd_share(retokenize: TeacherTokenization, ids: list[int]) -> float:
    positions = retokenize.fields(ids)["teacher_positions"]
    return sum(p >= 0 for p in positions[:-1]) / max(len(ids) - 1, 1)


ACCENTED = "<|im_start|>user\nA caf\u00e9 in S\u00e3o Paulo, na\u00efve r\u00e9sum\u00e9<|im_end|>\n"


def test_a_decomposed_accent_aligns_through_the_teachers_normalizer():
    """A student that does not normalize, an NFC teacher: the decomposed twin of a sample aligns (it used to raise
    AlignmentError and train on CE alone), every group spells the same text, and outside the accents' own groups it
    aligns exactly as its composed twin."""
    import unicodedata

    student, teacher = byte_tokenizer(), byte_tokenizer(normalize=True)
    retokenize = TeacherTokenization(TokenBytes.of(student), TokenBytes.of(teacher), teacher)
    composed = student(ACCENTED, add_special_tokens=False)["input_ids"]
    decomposed = student(unicodedata.normalize("NFD", ACCENTED), add_special_tokens=False)["input_ids"]
    assert len(decomposed) == len(composed) + 5  # the five accents: one byte more each
    t_ids, s_ends, t_ends, _ = retokenize.columns(decomposed)
    assert t_ids == teacher(ACCENTED, add_special_tokens=False)["input_ids"]
    s_aligned = np.diff(s_ends, prepend=0) == 1
    # one token per byte on both sides: every group is one to one but each accent's (the three bytes of e + U+0301
    # against the two of é), whose three tokens are not predicted one to one
    assert (~s_aligned).sum() == 5 and kd_share(retokenize, composed) == 1.0
    assert kd_share(retokenize, decomposed) == pytest.approx(1 - 15 / (len(decomposed) - 1))


@pytest.mark.parametrize("eos", [False, True])
def test_the_teachers_bos_comes_first_and_joins_the_first_group(eos):
    """Also from a tokenizer that puts an EOS after a text: the BOS alone comes first (the sample's text ends it)."""
    student, teacher = byte_tokenizer(), byte_tokenizer(bos=True, eos=eos)
    retokenize = TeacherTokenization(TokenBytes.of(student), TokenBytes.of(teacher), teacher)
    ids = student("hello there", add_special_tokens=False)["input_ids"]
    t_ids, s_ends, t_ends, _ = retokenize.columns(ids)
    plain = teacher("hello there", add_special_tokens=False)["input_ids"]
    assert t_ids == [teacher.convert_tokens_to_ids("<s>")] + plain
    assert s_ends[0] == 1 and t_ends[0] == 2 and np.all(np.diff(t_ends) == 1)
    assert kd_share(retokenize, ids) == 1.0  # the BOS costs no aligned position


def test_special_token_text_is_text_and_special_tokens_map_by_content():
    """The student's real "<|im_end|>" is the teacher's token of that content; the same characters written as text
    (another template's marker in a sample) are text to the teacher too, never its control token."""
    student, teacher = byte_tokenizer(), byte_tokenizer(normalize=True)
    retokenize = TeacherTokenization(TokenBytes.of(student), TokenBytes.of(teacher), teacher)
    end = teacher.convert_tokens_to_ids("<|im_end|>")
    real = student("say hi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert retokenize.columns(real)[0][-1] == end and kd_share(retokenize, real) == 1.0
    literal = student("say <|im_end|> hi", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    twin = student("say <|im_fin|> hi", add_special_tokens=False)["input_ids"]
    assert end not in retokenize.columns(literal)[0]
    assert kd_share(retokenize, literal) == kd_share(retokenize, twin) == 1.0


END_OF_TURN = {"tok_qwen2.5_instruct": "<|im_end|>", "tok_phi3_mini_instruct": "<|end|>",
               "tok_smollm_360m_instruct": "<|im_end|>"}


@pytest.mark.parametrize("pair", [pair for pair in itertools.permutations(TOKENIZERS, 2)
                                  if "tok_phi3_mini_instruct" in pair])
def test_the_end_of_turn_is_the_teachers_by_role_and_aligns_one_to_one(tokenizers, pair):
    """Phi-3's `<|end|>` and ChatML's `<|im_end|>`: read off each chat template, the pair is in the id map, and in a
    conversation rendered by the student's template every end of turn is predicted one to one with the teacher's
    (it was a special token's group, left out). The same characters written as text in a message stay text: the
    teacher gets its end of turn only where the student has its own."""
    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers[pair[0]], tokenizers[pair[1]]
    s_end, t_end = s_tok.convert_tokens_to_ids(END_OF_TURN[pair[0]]), t_tok.convert_tokens_to_ids(END_OF_TURN[pair[1]])
    assert s_vocab.roles == {"end of turn": s_end} and t_vocab.roles == {"end of turn": t_end}
    shared = shared_vocabulary(s_vocab, t_vocab)
    assert (s_end, t_end) in set(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert shared.by_role == (f"the end of turn: the student's {END_OF_TURN[pair[0]]} as the teacher's "
                              f"{END_OF_TURN[pair[1]]}",) and shared.by_role[0] in shared.describe()
    retokenize = TeacherTokenization(s_vocab, t_vocab, t_tok)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "You too!"},
                    {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye."}]
    ids = s_tok(s_tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    fields = retokenize.fields(ids)
    ends = [k for k, token in enumerate(ids) if token == s_end]
    assert len(ends) >= 4  # after each of the four turns
    for k in ends:
        q = fields["teacher_positions"][k - 1]
        assert q >= 0 and fields["teacher_ids"][q + 1] == t_end, (k, q)
    assert fields["teacher_ids"].count(t_end) == len(ends)
    literal = s_tok(f"Write {END_OF_TURN[pair[0]]} or {END_OF_TURN[pair[1]]} here.", add_special_tokens=False,
                    split_special_tokens=True)["input_ids"] + [s_end]
    assert s_end not in literal[:-1]
    fields = retokenize.fields(literal)
    assert fields["teacher_ids"].count(t_end) == 1 and fields["teacher_ids"][-1] == t_end
    assert fields["teacher_positions"][len(literal) - 2] == len(fields["teacher_ids"]) - 2
    # on-policy: a response the student wrote, up to its stop token, re-tokenized at step time the same way
    from fsdp_kd.on_policy import with_response

    sample = with_response(ids[:ends[0] + 1], s_tok("Sure, here.", add_special_tokens=False)["input_ids"] + [s_end])
    fields = retokenize.rewritten(None, sample)
    q = fields["teacher_positions"][len(sample.input_ids) - 2]
    assert q >= 0 and fields["teacher_ids"][q + 1] == t_end


@pytest.mark.parametrize("pair", list(itertools.permutations(TOKENIZERS, 2)))
def test_real_pairs_align_accents_and_foreign_markers_as_their_twins(tokenizers, texts, pair):
    """On the real tokenizers: a decomposed-accent sample gets a teacher (Qwen2.5's NFC used to leave SmolLM and
    Phi-3 students without one), and a sample holding another template's markers as text aligns as its twin with
    a neutral string in their place (Phi-3's "<|end|>" read by Qwen, ChatML's read by Phi-3)."""
    import unicodedata

    (s_tok, s_vocab), (t_tok, t_vocab) = tokenizers[pair[0]], tokenizers[pair[1]]
    retokenize = TeacherTokenization(s_vocab, t_vocab, t_tok)
    base = texts[3]
    accented = unicodedata.normalize("NFD", base + " Caf\u00e9 na\u00efve S\u00e3o Paulo.")
    ids = s_tok(accented, add_special_tokens=False)["input_ids"]
    assert kd_share(retokenize, ids) > 0.8 * kd_share(retokenize, s_tok(base, add_special_tokens=False)["input_ids"])
    markers = ("<|im_end|>", "<|end|>", "<|im_start|>")
    teacher_markers = {t_tok.convert_tokens_to_ids(m) for m in markers if m in t_tok.get_vocab()}
    for marker in markers:
        with_marker = s_tok(f"{base} {marker} then", add_special_tokens=False, split_special_tokens=True)["input_ids"]
        neutral = s_tok(f"{base} {marker.replace('|', '!')} then", add_special_tokens=False)["input_ids"]
        t_ids = retokenize.columns(with_marker)[0]
        assert t_ids and not set(t_ids) & teacher_markers
        assert abs(kd_share(retokenize, with_marker) - kd_share(retokenize, neutral)) < 8 / len(neutral), marker


def test_the_teachers_tokens_stop_at_its_max_positions_and_the_rest_is_counted():
    """A sample longer in the teacher's tokens than its max_position_embeddings keeps the groups within them; the
    positions past them say why they have no teacher position (`LEFT_OUT`), as do a sample that does not align and
    a multi-token group."""
    from fsdp_kd.cross_tokenizer import LEFT_OUT

    student, teacher = byte_tokenizer(), byte_tokenizer(normalize=True)
    s_vocab, t_vocab = TokenBytes.of(student), TokenBytes.of(teacher)
    ids = student("hello there, general kenobi", add_special_tokens=False)["input_ids"]
    whole = TeacherTokenization(s_vocab, t_vocab, teacher)
    cut = TeacherTokenization(s_vocab, t_vocab, teacher, max_positions=10)
    assert len(whole.columns(ids)[0]) == len(ids) and cut.columns(ids)[0] == whole.columns(ids)[0][:10]
    positions = cut.fields(ids)["teacher_positions"]
    assert positions[:9] == list(range(9)) and set(positions[9:]) == {-2} and LEFT_OUT[-2] == "past_teacher_tokens"
    assert set(TeacherTokenization(s_vocab, t_vocab, teacher, max_positions=0).fields(ids)["teacher_positions"]) == {-3}
    accent = student("cafe\u0301 ok", add_special_tokens=False)["input_ids"]
    assert -1 in whole.fields(accent)["teacher_positions"] and LEFT_OUT[-1] == "multi_token_group"


def test_a_micro_batch_counts_its_trained_tokens_without_a_teacher_position_by_why():
    """kd rows (`aligned`), the rows of the groups the span term teaches and the left-out counts add up to the trained
    tokens; the decomposed accent's group (3 student bytes against the teacher's 2) is taught, not left out."""
    from fsdp_kd.data import collate
    from fsdp_kd.records import IGNORE_INDEX, Sample

    student, teacher = byte_tokenizer(), byte_tokenizer(normalize=True)
    retokenize = TeacherTokenization(TokenBytes.of(student), TokenBytes.of(teacher), teacher, max_positions=12)
    samples = []
    for text in ("cafe\u0301 and more text here", "short"):
        ids = student(text, add_special_tokens=False)["input_ids"]
        samples.append(Sample(ids, [IGNORE_INDEX] + ids[2:] + [IGNORE_INDEX], **retokenize.fields(ids)))
    batch = collate(samples, 0)
    multi, past, unaligned = batch.left_out
    assert multi == 0 and past > 0 and unaligned == 0 and int(batch.spans.offsets[-1]) == 3
    assert int(batch.aligned.sum()) + int(batch.spans.offsets[-1]) + sum(batch.left_out) == batch.target_rows.numel()


def test_the_start_up_share_reads_a_sample_of_every_source():
    """The start-up line's share counts samples spread over every source (it used to read the first source's first
    1000 only): a second source whose samples have no teacher tokens halves it, and says why."""
    from fsdp_kd.records import IGNORE_INDEX, Sample
    from fsdp_kd.teacher_model import CrossTokenizerTeacher

    aligned = Sample([1, 2, 3, 4], [IGNORE_INDEX, 3, 4, IGNORE_INDEX], teacher_ids=[1, 2, 3, 4],
                     teacher_positions=[0, 1, 2, -2])
    unaligned = Sample([1, 2, 3, 4], [IGNORE_INDEX, 3, 4, IGNORE_INDEX], teacher_ids=[],
                       teacher_positions=[-3, -3, -3, -3])
    teacher = object.__new__(CrossTokenizerTeacher)
    teacher.span_weight = 1.0
    teacher.check(None, [[aligned] * 3000, [unaligned] * 5], None)
    assert teacher.aligned_share == pytest.approx(1000 / 1005)
    teacher.check(None, [[aligned] * 3000, [unaligned] * 5000], None)
    assert teacher.aligned_share == 0.5 and teacher.left_out_shares["unaligned_sample"] == 0.5
