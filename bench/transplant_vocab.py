"""A student of another tokenizer made from a real model: its layers, with the embeddings moved to a new vocabulary.

    python bench/transplant_vocab.py --model STUDENT_DIR --tokenizer TOKENIZER_DIR --out DIR

There is one real model on this machine (bench/real_teacher_model.py), so a cross-tokenizer recipe needs a student of
another tokenizer made from it. Each token of the new vocabulary starts as the mean of the model's embeddings of the
tokens its own tokenizer cuts that token's text into (the usual vocabulary-transplant initialisation, as in
WECHSEL or FOCUS without their similarity weighting); a new control token takes the old token of the same content,
and a new end-of-turn or end-of-text token the mean of the old ones (`on_policy.stop_token_ids` on both sides), so
the student can stop from the start. The head stays tied to the embeddings where the model ties them; an untied head
is moved the same way. The result is an ordinary HF directory with the new tokenizer and a generation config whose
stop ids are the new tokenizer's."""

from __future__ import annotations

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fsdp_kd.cross_tokenizer import TokenBytes  # noqa: E402
from fsdp_kd.on_policy import stop_token_ids  # noqa: E402


def source_pieces(new_tokenizer, old_tokenizer) -> list[list[int]]:
    """For each new id, the old ids whose embeddings start it."""
    new, old = TokenBytes.of(new_tokenizer), TokenBytes.of(old_tokenizer)
    old_added = {old.spelled[i]: i for i in old.added}
    old_single = {}  # a byte the old vocabulary spells with one token (byte-level BPE has all 256)
    for i, spelled in enumerate(old.spelled):
        if len(spelled) == 1 and (spelled not in old_single or old.regular[i]):
            old_single[spelled] = i
    new_stops, old_stops = set(stop_token_ids(new_tokenizer)), list(stop_token_ids(old_tokenizer))
    pieces = []
    for i, spelled in enumerate(new.spelled):
        if i in new.added and spelled in old_added:
            pieces.append([old_added[spelled]])
        elif i in new.added and i in new_stops:
            pieces.append(old_stops)
        else:
            try:
                ids = old_tokenizer(spelled.decode("utf-8"), add_special_tokens=False)["input_ids"]
            except UnicodeDecodeError:  # a lone byte of a character (byte fallback): the old token of that byte
                ids = [old_single[bytes([b])] for b in spelled if bytes([b]) in old_single]
            pieces.append(ids or [old_tokenizer.unk_token_id or 0])
    return pieces


def transplant(model_dir: str, tokenizer_dir: str, out: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    old_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    new_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pieces = source_pieces(new_tokenizer, old_tokenizer)
    index = torch.tensor([j for ids in pieces for j in ids])
    owner = torch.tensor([i for i, ids in enumerate(pieces) for _ in ids])
    counts = torch.bincount(owner, minlength=len(pieces)).clamp_min(1)[:, None].float()

    def moved(weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(pieces), weight.shape[1]).index_add_(0, owner, weight.detach()[index]) / counts

    embeddings = moved(model.get_input_embeddings().weight)
    tied = model.config.get_text_config().tie_word_embeddings
    head = None if tied else moved(model.get_output_embeddings().weight)
    model.resize_token_embeddings(len(pieces))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embeddings)
        if head is not None:
            model.get_output_embeddings().weight.copy_(head)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(new_tokenizer, key))
    model.generation_config = GenerationConfig(bos_token_id=new_tokenizer.bos_token_id,
                                               eos_token_id=list(stop_token_ids(new_tokenizer)),
                                               pad_token_id=new_tokenizer.pad_token_id)
    model.save_pretrained(out)
    new_tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the HF model directory whose layers the student keeps")
    parser.add_argument("--tokenizer", required=True, help="a directory with the new tokenizer")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        sys.exit(f"error: {args.out} already holds a model; remove it or pass another --out")
    print(transplant(args.model, args.tokenizer, args.out))


if __name__ == "__main__":
    main()
