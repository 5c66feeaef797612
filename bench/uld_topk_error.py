"""ULD's top-k against the full sort, on real vocabularies: how much of the ULD term `uld_topk` leaves out.

    python bench/uld_topk_error.py [--teacher tok_qwen2.5_instruct] [--student tok_smollm_360m_instruct]

The loss's ULD part (`cross_vocab.uld`) sums |p̃_(i) - q̃_(i)| over the first k ranks of each side's tokens without
a counterpart, sorted; the full sort sums over every rank. No real model runs here (none is on this machine), so
the distributions are stand-ins with the real vocabularies' sizes, shared tokens and text: each side is an
interpolated bigram model of its own tokenizer, fitted on GSM8K answers (p = 0.9·bigram + (0.1 - F)·unigram + F·
uniform over the vocabulary, F = `--floor`; a context the fit never saw gets the unigram and uniform parts alone,
in the same 0.1 - F : F proportion), read at the positions where the two tokenizations of held-out GSM8K answers
align one to one. How the error compares with real models' is not known: it depends on how flat their tails are,
which the floor stands for. The bound printed beside it (the two tails' mass past rank k, docs/cross_tokenizer.md)
holds for any distributions.

Prints, per k: the mean ULD with the full sort, the mean share of it that the top-k leaves out, the largest such
share at one position, and the mean bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))



class Bigram:
    """An interpolated bigram model of one tokenizer's ids, fitted on texts: `weights` of the bigram, the unigram and
    the uniform distribution over the vocabulary."""

    def __init__(self, tokenizer, texts: list[str], weights: tuple[float, float, float]):
        self.size, self.weights = len(tokenizer), weights
        self.pairs: dict[int, dict[int, int]] = {}
        unigram = np.zeros(self.size)
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            np.add.at(unigram, ids, 1)
            for a, b in zip(ids, ids[1:]):
                row = self.pairs.setdefault(a, {})
                row[b] = row.get(b, 0) + 1
        self.background = torch.from_numpy(weights[1] * unigram / unigram.sum() + weights[2] / self.size)

    def next_probs(self, prev: int) -> torch.Tensor:
        row = self.pairs.get(prev)
        if not row:  # an unseen context: the background alone, renormalized
            return self.background / self.background.sum()
        probs = self.background.clone()
        ids, counts = zip(*row.items())
        probs[list(ids)] += self.weights[0] * torch.tensor(counts, dtype=torch.float64) / sum(counts)
        return probs


def uld_terms(p: torch.Tensor, q: torch.Tensor, ks: list[int]) -> tuple[float, dict[int, tuple[float, float]]]:
    """(full ULD, {k: (left out by the top-k, the bound)}) for one position's unshared distributions."""
    p_sorted, q_sorted = p.sort(descending=True).values, q.sort(descending=True).values
    n = max(len(p_sorted), len(q_sorted))
    p_sorted = torch.nn.functional.pad(p_sorted, (0, n - len(p_sorted)))
    q_sorted = torch.nn.functional.pad(q_sorted, (0, n - len(q_sorted)))
    gaps = (p_sorted - q_sorted).abs()
    full = float(gaps.sum())
    out = {k: (float(gaps[k:].sum()), float(p_sorted[k:].sum() + q_sorted[k:].sum())) for k in ks}
    return full, out


def main() -> None:
    from transformers import AutoTokenizer

    from assets import _resolve
    from fsdp_kd.cross_tokenizer import TeacherTokenization, TokenBytes, shared_vocabulary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="tok_qwen2.5_instruct")
    parser.add_argument("--student", default="tok_smollm_360m_instruct")
    parser.add_argument("--fit", type=int, default=4000, help="GSM8K answers the bigram models are fitted on")
    parser.add_argument("--positions", type=int, default=400, help="aligned positions scored")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 64, 256, 1024])
    parser.add_argument("--floor", type=float, default=0.01, help="the uniform distribution's weight (the rest: 0.9 "
                                                                   "bigram, then unigram)")
    args = parser.parse_args()
    paths = {name: _resolve(name) for name in (args.teacher, args.student, "gsm8k/train.jsonl")}
    if any(p is None for p in paths.values()):
        sys.exit("the real tokenizers and GSM8K are needed (../shared/realdata, or FSDP_KD_ASSETS)")
    records = [json.loads(line)["answer"] for line in itertools.islice(open(paths["gsm8k/train.jsonl"]),
                                                                        args.fit + 200)]
    fit, held_out = records[:args.fit], records[args.fit:]
    s_tok, t_tok = AutoTokenizer.from_pretrained(paths[args.student]), AutoTokenizer.from_pretrained(paths[args.teacher])
    s_bytes, t_bytes = TokenBytes.of(s_tok), TokenBytes.of(t_tok)
    shared = shared_vocabulary(s_bytes, t_bytes)
    s_unshared = torch.ones(len(s_tok), dtype=torch.bool)
    s_unshared[torch.from_numpy(shared.student_ids)] = False
    t_unshared = torch.ones(len(t_tok), dtype=torch.bool)
    t_unshared[torch.from_numpy(shared.teacher_ids)] = False
    weights = (0.9, 0.1 - args.floor, args.floor)
    s_model, t_model = Bigram(s_tok, fit, weights), Bigram(t_tok, fit, weights)
    retokenize = TeacherTokenization(s_bytes, t_bytes, t_tok)
    fulls, left, bounds = [], {k: [] for k in args.ks}, {k: [] for k in args.ks}
    for text in held_out:
        ids = s_tok(text, add_special_tokens=False)["input_ids"]
        fields = retokenize.fields(ids)
        t_ids, at = fields["teacher_ids"], np.asarray(fields["teacher_positions"])
        for p_pos in np.flatnonzero(at >= 0):
            p = t_model.next_probs(t_ids[at[p_pos]])[t_unshared]
            q = s_model.next_probs(ids[p_pos])[s_unshared]
            full, parts = uld_terms(p, q, args.ks)
            fulls.append(full)
            for k, (out, bound) in parts.items():
                left[k].append(out / max(full, 1e-12))
                bounds[k].append(bound)
            if len(fulls) >= args.positions:
                break
        if len(fulls) >= args.positions:
            break
    print(f"teacher {args.teacher} ({len(t_tok)}), student {args.student} ({len(s_tok)}); {shared.describe()}")
    print(f"{len(fulls)} aligned positions of held-out GSM8K answers; stand-in distributions: interpolated bigram "
          f"models ({weights[0]:g} bigram, {weights[1]:g} unigram, {weights[2]:g} uniform) fitted on {args.fit} "
          "answers")
    print(f"mean ULD with the full sort: {np.mean(fulls):.4f}")
    print("| uld_topk | mean share left out | largest share left out | mean bound (tails past k) |\n|---|---|---|---|")
    for k in args.ks:
        print(f"| {k} | {100 * np.mean(left[k]):.2f}% | {100 * np.max(left[k]):.2f}% | {np.mean(bounds[k]):.4f} |")


if __name__ == "__main__":
    main()
