"""Tokenizers: loading the ones a run names, with one line for what is wrong, and whether teacher and student speak
the same tokens."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import ConfigError


def load_tokenizer(path: str, trust_remote_code: bool, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """`chat_template` (Jinja text, or a path to a file of it) replaces the tokenizer's own. Nothing else changes:
    the export saves this tokenizer, and a pad token it never had would change what `generate` and servers do."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = (open(chat_template).read() if os.path.isfile(chat_template) else chat_template)
    return tokenizer


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded positions: never attended to and never trained, so any valid id does; the pad
    token when the tokenizer has one, else EOS."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def tokenizer_or_error(path: str, key: str, trust_remote_code: bool, chat_template: str | None = None):
    """A path that is neither a local directory nor a reachable hub id fails here, as one line."""
    try:
        return load_tokenizer(path, trust_remote_code, chat_template)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"key {key}: cannot load a tokenizer from the directory {path} ({reason}); it needs the "
                              "tokenizer files of the model (tokenizer.json or tokenizer.model, "
                              "tokenizer_config.json)") from None
        raise ConfigError(f"key {key}: cannot load a tokenizer from {path!r} (not a local directory, and as a hub id: "
                          f"{reason})") from None


def student_tokenizer(path: str, trust_remote_code: bool, chat_template: str | None,
                      apply_chat_template: bool) -> PreTrainedTokenizerBase:
    """The student's tokenizer (key `pretrain`), which renders the data: `tokenizer_or_error`, and refused when
    `apply_chat_template` cannot use it (see `check_chat_template`)."""
    tokenizer = tokenizer_or_error(path, "pretrain", trust_remote_code, chat_template)
    check_chat_template(tokenizer, path, apply_chat_template)
    return tokenizer


def check_chat_template(tokenizer: PreTrainedTokenizerBase, path: str, apply_chat_template: bool) -> None:
    """The student's tokenizer (key `pretrain`) renders the data. With `apply_chat_template` it needs a chat template,
    its own or `tokenizer_chat_template`; without one, transformers fails on the first record with a traceback,
    after the process group is up. The teacher's tokenizer renders nothing, so a base-model teacher with no template
    is fine."""
    if apply_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"key apply_chat_template: the tokenizer of pretrain ({path}) has no chat template; set "
                          "tokenizer_chat_template (a Jinja template or a file), or drop --apply_chat_template")


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends an assistant's turn: the first special or added token the chat template writes after an
    assistant message (Phi-3's `<|end|>`, ChatML's `<|im_end|>`), read from a rendered exchange with a marker message
    (with a system message first where the template refuses one without). None when there is no template or it writes
    no such token: the EOS is another role (the end of a document), never taken for this one."""
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "fsdp-kd end-of-turn probe"
    exchange = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for messages in (exchange, [{"role": "system", "content": "s"}, *exchange]):
        try:
            turn = tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError:  # e.g. a template that requires a system message first
            continue
        if marker in turn:
            after = tokenizer(turn[turn.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
            return next((i for i in after if i in special), None)
    return None


def _id_to_token(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    table: list[str | None] = [None] * len(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx < len(table):
            table[idx] = token
    return table


def shared_vocab_size(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> int:
    """The id range both distributions are compared over: the student tokenizer's.

    Padded embedding rows (Qwen's 151936 vs 152064) are fine because only tokenizer ids count. A teacher whose
    tokenizer maps any of those ids to a different token is a different tokenizer, and is refused.
    """
    student, teacher = _id_to_token(student_tok), _id_to_token(teacher_tok)
    if len(teacher) < len(student):
        raise ConfigError(f"teacher tokenizer has {len(teacher)} tokens, fewer than the student's {len(student)}: "
                          "the teacher and student must share a tokenizer, or set cross_tokenizer: true")
    for idx, (s, t) in enumerate(zip(student, teacher)):
        if s != t:
            raise ConfigError(f"teacher and student tokenizers differ at id {idx}: student {s!r} vs teacher {t!r}; "
                              "pick a teacher from the student's model family, or set cross_tokenizer: true to "
                              "distil across tokenizers (docs/cross_tokenizer.md)")
    return len(student)
