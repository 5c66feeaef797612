"""Why the demo's KD student beats its teacher on exact match while matching its distribution.

    python bench/exact_match.py --demo_out demo_out [--seed 0] [--words 2000]

Reads the teacher and the KD student a finished demo left in `demo_out` (run with the same `--seed`), rebuilds that
seed's task, and scores both on fresh words, teacher-forced on the most likely rendering:
  - per letter and whole word: how often the model's argmax is the most likely rendering (exact match asks this,
    letter after letter);
  - KL(true ‖ model) per letter over the three renderings: how well the model knows the odds;
  - the standard deviation, from word to word, of the model's probability for the most likely rendering within one
    (previous letter, letter) context, averaged over contexts: how steady the model is;
  - in how many contexts the model, averaged over words, ranks the most likely rendering first.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fsdp_kd.testing.tiny import RENDERING_PROBS, SOURCE_LETTERS, rendering_table  # noqa: E402


@torch.no_grad()
def score(model_dir: str, tok, table: dict, words: list[str]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    letter_hits = word_hits = 0
    kl = 0.0
    p_mode = collections.defaultdict(list)  # context -> the model's p(most likely rendering), one per word
    p_renderings = collections.defaultdict(list)  # context -> the model's p over the three renderings, one per word
    for word in words:
        contexts = list(zip(" " + word, word))
        renderings = [table[c] for c in contexts]
        prompt = tok(f"{word}:")["input_ids"]
        ids = tok(f"{word}:" + "".join(r[0] for r in renderings))["input_ids"]
        log_q = torch.log_softmax(model(torch.tensor([ids])).logits[0, len(prompt) - 1:len(ids) - 1].double(), -1)
        all_right = True
        for row, (context, rendering) in enumerate(zip(contexts, renderings)):
            candidates = tok.convert_tokens_to_ids(rendering)
            right = int(log_q[row].argmax()) == candidates[0]
            letter_hits += right
            all_right &= right
            kl += sum(p * (math.log(p) - float(log_q[row, c])) for p, c in zip(RENDERING_PROBS, candidates))
            p_mode[context].append(float(log_q[row, candidates[0]].exp()))
            p_renderings[context].append(log_q[row, candidates].exp())
        word_hits += all_right
    letters = sum(len(w) for w in words)
    return {"word": word_hits / len(words), "letter": letter_hits / letters, "kl": kl / letters,
            "std": sum(torch.tensor(v).std().item() for v in p_mode.values()) / len(p_mode),
            "mode_first": sum(int(torch.stack(v).mean(0).argmax()) == 0 for v in p_renderings.values()),
            "contexts": len(p_renderings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_out", default="demo_out")
    parser.add_argument("--seed", type=int, default=0, help="the demo's --seed")
    parser.add_argument("--words", type=int, default=2000)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(args.demo_out, "teacher"))
    fresh = random.Random(12345)  # not the task's stream: words the demo never drew
    words = ["".join(fresh.choice(SOURCE_LETTERS) for _ in range(6)) for _ in range(args.words)]
    table = rendering_table(random.Random(args.seed))  # translation_task's first draws
    print(f"{args.words} fresh words, teacher-forced on the most likely rendering")
    print("| model | word | letter | KL(true‖model) per letter | std of p(mode) within a context | mode first |")
    print("|---|---|---|---|---|---|")
    for name in ("teacher", "kd_student"):
        s = score(os.path.join(args.demo_out, name), tok, table, words)
        print(f"| {name} | {s['word']:.1%} | {s['letter']:.1%} | {s['kl']:.4f} | {s['std']:.4f} | "
              f"{s['mode_first']}/{s['contexts']} |")


if __name__ == "__main__":
    main()
