"""Tiny models, tokenizer and task for tests, benches and the demo, built in seconds with no downloads.

A character tokenizer in HF format (optionally with two-character tokens), randomly initialized Llama- or
Qwen2-shaped models, and the toy translation task whose renderings are ambiguous (`translation_task`): a sampled
label shows one rendering, a teacher's distribution shows all of them with their odds.
"""

from __future__ import annotations

import json
import random
import re

import torch

CHARS = list("0123456789+=-*() \nABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,:?")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


def build_char_tokenizer(out_dir: str, extra_chars: str = "", pairs: tuple[str, ...] = ()):
    """A character-level fast tokenizer saved in HF format: ids are stable and every string round-trips. `pairs`
    are tokens of two characters, taken wherever they occur, left to right, before single characters: a second
    tokenizer of the same text (the cross-tokenizer student), whose ids differ from the first one's after the
    characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = CHARS + [c for c in extra_chars if c not in CHARS]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars + list(pairs))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("".join(f"{re.escape(p)}|" for p in pairs) + "."),
                                              behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(out_dir: str, vocab_size: int, hidden: int, layers: int, family: str = "llama",
                     seed: int = 0, tie: bool = False, heads: int = 4, init_std: float = 0.02) -> None:
    """A randomly initialized Llama- or Qwen2-shaped model saved with save_pretrained; `init_std` is the standard
    deviation of its initial weights (0.02, the transformers default, leaves models this small on a plateau of
    their loss for their first hundred or so steps on the demo's task; 0.05 does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, config_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                        max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1,
                        bos_token_id=None, initializer_range=init_std)
    torch.manual_seed(seed)
    cls(config).save_pretrained(out_dir)


SOURCE_LETTERS = "abcdefgh"
TARGET_LETTERS = "ABCDEFGHIJKLMNOP"
RENDERING_PROBS = (0.5, 0.3, 0.2)


def rendering_table(rng: random.Random) -> dict[tuple[str, str], list[str]]:
    """(previous source letter or " ", source letter) -> its three target renderings, most likely first."""
    return {(prev, cur): rng.sample(TARGET_LETTERS, len(RENDERING_PROBS))
            for prev in " " + SOURCE_LETTERS for cur in SOURCE_LETTERS}


def translation_task(seed: int, n_train: int, n_eval: int, word_len: int = 6):
    """A toy translation with ambiguous renderings: each source letter, in the context of the letter before it,
    is rendered as one of three target letters with probabilities 0.5 / 0.3 / 0.2.

    Responses are *samples*, so a hard label reveals one rendering; a teacher that has fit the data knows all three
    and their odds. That is the information distillation can pass on and CE cannot.
    Returns (train, eval, eval_mode): eval responses are sampled like the training data (eval CE and KL read
    them); eval_mode holds the same prompts with the most likely rendering (exact match scores against it).
    """
    rng = random.Random(seed)
    table = rendering_table(rng)

    def render(word: str, sampled: bool) -> str:
        contexts = [table[(prev, cur)] for prev, cur in zip(" " + word, word)]
        return "".join(rng.choices(c, RENDERING_PROBS)[0] if sampled else c[0] for c in contexts)

    words = ["".join(rng.choice(SOURCE_LETTERS) for _ in range(word_len)) for _ in range(n_train + n_eval)]
    train = [{"input": f"{w}:", "output": render(w, True)} for w in words[:n_train]]
    held_out = words[n_train:]
    return (train, [{"input": f"{w}:", "output": render(w, True)} for w in held_out],
            [{"input": f"{w}:", "output": render(w, False)} for w in held_out])


def write_jsonl(path: str, records: list[dict]) -> None:
    """One JSON record per line."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]
