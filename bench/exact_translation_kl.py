"""The demo's students scored against the teacher's exact translation into each student's own tokens.

The demo's second tokenizer (`demo.prepare_task`) is the teacher's characters plus letter pairs, taken greedily left
to right (`testing.tiny.build_char_tokenizer`): at a position, the next token is the pair "cX" exactly when the text
continues with c then X, and the single character c when it continues with c and then no X that makes a pair. So
the teacher's distribution, written in the student's tokens, is exact:

    q*(c X) = p(c)·p(X | c)        q*(c) = p(c)·(1 - Σ_{X: cX a pair} p(X | c))        q*(<eos>) = p(<eos>)

with p(c) the teacher's next-character probability at the position and p(X | c) at the next one, after the context
with c appended (one more teacher forward per first letter of a pair). A student that learned the teacher perfectly,
in its own tokens, is q*. Printed per model:

- `KL(q*‖q)`: per response position (every one: with one character per teacher token, every student position's
  context ends where a teacher token does), over the student's whole vocabulary. For a character student q* is the
  teacher's own distribution and this is the plain KL, so the column compares like with like across tokenizers.
- `aligned KL`: `demo.aligned_scores`'s KL per one-to-one aligned token, and the same for q* itself (`the exact
  translation`): what that metric charges a student that is the teacher, exactly, in other tokens.

and last, the exact match that greedy decoding would give q* in the first model's tokens and the teacher in its own
(`greedy_exact_match`), on the held-out prompts: greedy over pair tokens is not greedy over characters.

    python bench/exact_translation_kl.py --dir DEMO_OUT [--models row0 row1 ...]

DIR is a `bench/divergence_demo.py --cross_tokenizer` seed folder (models row0..row3) or a demo output folder
(kd_student, kd_pair_student, ...); its teacher and data/eval.jsonl are read.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def exact_translation(teacher, t_ids: list[int], rows: torch.Tensor, before: list[str], char_ids: dict[str, int],
                      pairs: dict[str, int], student_size: int) -> torch.Tensor:
    """[len(rows), student_size] log q* at the teacher rows `rows` (each predicting the character after it), each
    after the student token `before` (a single character c there rules out every X that would have made cX a pair:
    q* is the teacher's distribution given that cut, renormalized)."""
    log_p = torch.log_softmax(teacher(torch.tensor([t_ids])).logits[0].double(), -1)[rows]
    out = torch.full((len(rows), student_size), -torch.inf, dtype=torch.float64)
    n_special = min(char_ids.values())
    out[:, :n_special] = log_p[:, :n_special]  # special tokens: the same ids on both sides
    firsts = sorted({pair[0] for pair in pairs})
    if not firsts:  # the teacher's own tokenizer: q* is p
        out[:, n_special:] = log_p[:, n_special:student_size]
        return out
    # p(· | context + c) for each first letter c: the sample with c at the next position, read one row later
    alt = torch.tensor([t_ids] * (len(rows) * len(firsts)))
    at = torch.arange(len(rows)).repeat_interleave(len(firsts))
    alt[torch.arange(len(alt)), rows[at] + 1] = torch.tensor([char_ids[c] for c in firsts]).repeat(len(rows))
    log_next = torch.log_softmax(teacher(alt).logits.double(), -1)[torch.arange(len(alt)), rows[at] + 1]
    log_next = log_next.view(len(rows), len(firsts), -1)
    for c, i in char_ids.items():
        out[:, i] = log_p[:, i]
    for k, c in enumerate(firsts):
        made = [(pair, s_id) for pair, s_id in pairs.items() if pair[0] == c]
        pair_mass = torch.stack([log_next[:, k, char_ids[pair[1]]] for pair, _ in made], 1).exp().sum(1)
        out[:, char_ids[c]] = log_p[:, char_ids[c]] + torch.log1p(-pair_mass)
        for pair, s_id in made:
            out[:, s_id] = log_p[:, char_ids[c]] + log_next[:, k, char_ids[pair[1]]]
    for row, token in enumerate(before):
        ruled_out = [pair[1] for pair in pairs if pair[0] == token]
        if ruled_out:
            starts = [char_ids[x] for x in ruled_out] + [i for pair, i in pairs.items() if pair[0] in ruled_out]
            out[row] -= torch.log1p(-log_p[row, [char_ids[x] for x in ruled_out]].exp().sum())
            out[row, starts] = -torch.inf
    return out


def translate(teacher, s_tok, t_tok, record: dict) -> tuple[list[int], list[int], int, list[int], torch.Tensor,
                                                             torch.Tensor]:
    """A record's text as both sides read it, and q* along the student's response: (the student's ids, the
    teacher's, the student's prompt length, each student token's length in characters, the response tokens' indices,
    log q* there [tokens, student vocabulary])."""
    t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
    char_ids = {c: i for c, i in t_vocab.items() if c not in set(t_tok.all_special_tokens)}
    assert all(s_vocab[c] == i for c, i in char_ids.items()) and len(t_vocab) == max(t_vocab.values()) + 1
    pairs = {tok: i for tok, i in s_vocab.items() if tok not in t_vocab}
    text = record["input"] + record["output"]
    s_ids = s_tok(text)["input_ids"] + [s_tok.eos_token_id]
    t_ids = t_tok(text)["input_ids"] + [t_tok.eos_token_id]
    prompt = len(s_tok(record["input"])["input_ids"])
    lengths = [len(s_tok.convert_ids_to_tokens(i)) for i in s_ids[:-1]] + [1]
    starts = torch.tensor([0] + lengths).cumsum(0)[:-1]  # each student token's character offset
    tokens = torch.arange(prompt, len(s_ids))
    before = s_tok.convert_ids_to_tokens(s_ids[prompt - 1:-1])
    log_star = exact_translation(teacher, t_ids, starts[tokens] - 1, before, char_ids, pairs, len(s_tok))
    return s_ids, t_ids, prompt, lengths, tokens, log_star


def aligned_kl(log_p: torch.Tensor, log_q: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """`demo.aligned_scores`'s KL summed over rows: the teacher's whole distribution (all shared) against the
    student's shared tokens plus one bucket for its others (which the teacher leaves empty)."""
    return (log_p.exp() * (log_p - log_q[:, shared])).sum()


@torch.no_grad()
def score(model_dir: str, teacher_dir: str, data: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsdp_kd.testing.tiny import read_jsonl

    s_tok, t_tok = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    shared = torch.arange(len(t_tok))
    sums = dict.fromkeys(("kl_all", "kl_aligned", "aligned", "aligned_oracle", "positions", "aligned_rows"), 0.0)
    for r in read_jsonl(data):
        s_ids, t_ids, prompt, lengths, tokens, log_star = translate(teacher, s_tok, t_tok, r)
        t_rows = torch.tensor([0] + lengths).cumsum(0)[tokens] - 1
        log_q = torch.log_softmax(model(torch.tensor([s_ids])).logits[0].double(), -1)[tokens - 1, :len(s_tok)]
        t_all = torch.log_softmax(teacher(torch.tensor([t_ids])).logits[0].double(), -1)
        log_p = t_all[t_rows, :len(t_tok)]
        # a check that q* is exact: along the student's tokens it gives the response the teacher's probability
        t_logp = t_all[torch.arange(len(r["input"]) - 1, len(t_ids) - 1), t_ids[len(r["input"]):]].sum()
        s_logp = log_star[torch.arange(len(tokens)), torch.tensor(s_ids)[tokens]].sum()
        assert torch.isclose(t_logp, s_logp, atol=1e-6), (t_logp, s_logp)
        kl = torch.where(log_star > -torch.inf, log_star.exp() * (log_star - log_q), 0.0).sum(1)
        one = torch.tensor([lengths[i] == 1 for i in tokens.tolist()])  # one to one: a single character (or eos)
        sums["kl_all"] += float(kl.sum())
        sums["kl_aligned"] += float(kl[one].sum())
        sums["aligned"] += float(aligned_kl(log_p[one], log_q[one], shared))
        sums["aligned_oracle"] += float(aligned_kl(log_p[one], log_star[one], shared))
        sums["positions"] += len(tokens)
        sums["aligned_rows"] += int(one.sum())
    return {"KL(q*‖q) per position": sums["kl_all"] / sums["positions"],
            "KL(q*‖q) per aligned position": sums["kl_aligned"] / sums["aligned_rows"],
            "aligned KL (demo.aligned_scores)": sums["aligned"] / sums["aligned_rows"],
            "aligned KL of q* itself": sums["aligned_oracle"] / sums["aligned_rows"],
            "share aligned": sums["aligned_rows"] / sums["positions"]}


@torch.no_grad()
def greedy_exact_match(tok_dir: str, teacher_dir: str, data: str) -> tuple[float, float]:
    """(q*'s greedy exact match in `tok_dir`'s tokens, the teacher's in its own) on the most likely renderings
    (`data`: eval_mode.jsonl): the share of prompts where the most likely token, teacher-forced on the rendering, is
    the rendering's at every response position, which is when greedy decoding writes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsdp_kd.testing.tiny import read_jsonl

    s_tok, t_tok = AutoTokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    hits = teacher_hits = 0
    records = read_jsonl(data)
    for r in records:
        s_ids, t_ids, _, _, tokens, log_star = translate(teacher, s_tok, t_tok, r)
        hits += bool((log_star.argmax(1) == torch.tensor(s_ids)[tokens]).all())
        t_rows = torch.arange(len(r["input"]) - 1, len(t_ids) - 1)
        teacher_hits += bool((teacher(torch.tensor([t_ids])).logits[0, t_rows].argmax(1) ==
                              torch.tensor(t_ids)[t_rows + 1]).all())
    return hits / len(records), teacher_hits / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--models", nargs="+", default=["row0", "row1", "row2", "row3"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, data = os.path.join(args.dir, "teacher"), os.path.join(args.dir, "data", "eval.jsonl")
    header = None
    for name in args.models:
        result = score(os.path.join(args.dir, name), teacher, data)
        if header is None:
            header = list(result)
            print("| model | " + " | ".join(header) + " |\n|---|" + "---|" * len(header))
        print(f"| {name} | " + " | ".join(f"{result[k]:.5f}" for k in header) + " |", flush=True)
    exact, teacher_exact = greedy_exact_match(os.path.join(args.dir, args.models[-1]), teacher,
                                              os.path.join(args.dir, "data", "eval_mode.jsonl"))
    print(f"greedy exact match of q* in {args.models[-1]}'s tokens: {exact:.1%}; of the teacher: {teacher_exact:.1%}")


if __name__ == "__main__":
    main()
