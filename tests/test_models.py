"""Teacher/student tokenizer agreement: padded rows are fine, a different tokenizer is refused."""

import pytest

from fsdp_kd.config import ConfigError
from fsdp_kd.demo import build_char_tokenizer
from fsdp_kd.models import load_tokenizer, shared_vocab_size

from conftest import REALDATA


def test_same_tokenizer_shares_its_full_range(tiny):
    tok = load_tokenizer(tiny["tok"], False)
    assert shared_vocab_size(tok, tok) == len(tok)


def test_teacher_with_extra_tokens_beyond_the_students_range_is_fine(tiny, tmp_path):
    student = load_tokenizer(tiny["tok"], False)
    teacher = build_char_tokenizer(str(tmp_path / "t"), extra_chars="äöü")
    assert shared_vocab_size(student, teacher) == len(student) < len(teacher)


def test_real_tokenizers_that_differ_are_refused_with_the_first_differing_id():
    qwen = load_tokenizer(str(REALDATA / "tok_qwen2.5_instruct"), False)
    smollm = load_tokenizer(str(REALDATA / "tok_smollm_360m_instruct"), False)
    with pytest.raises(ConfigError, match=r"tokenizers differ at id 0: student .* vs teacher"):
        shared_vocab_size(smollm, qwen)
    with pytest.raises(ConfigError, match="fewer than the student's"):
        shared_vocab_size(qwen, smollm)


def test_qwen_tokenizer_range_is_its_length_not_the_padded_embedding():
    qwen = load_tokenizer(str(REALDATA / "tok_qwen2.5_instruct"), False)
    assert shared_vocab_size(qwen, qwen) == 151665  # models pad their embeddings to 151936; those rows are ignored
