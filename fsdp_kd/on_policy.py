"""On-policy distillation (GKD): for a share λ of the micro-batches the student writes the responses, and the teacher's
distribution on the student's own tokens is the target.

Off-policy KD trains on responses the student would never write, so at inference it meets contexts it never saw.
Here a micro-batch chosen as on-policy (probability `on_policy_ratio`, drawn per step and micro-batch index from the
run's seed, alike on every rank) keeps its prompts and gets new responses sampled from the current student, and then
trains like any micro-batch, against the live teacher (a cache cannot grade text written after it was built). The
CE term is off on these micro-batches unless `on_policy_ce` is set, since it would only reinforce the student's own
samples; the KD term keeps its weight `kd_coef`.

A rank generates once per step: the prompts of all its on-policy micro-batches in one left-padded batch, with the
student gathered once for it (every FSDP unit unsharded, resharded after), so the layers are not gathered again for
every token; `decode` runs the loop (static KV cache, sampling and stop tracking on the device, no host sync per
token). Each row samples from its own stream seeded from (seed, step, micro-batch, rank, row): a resumed run writes
exactly the same responses, however the rows are batched. Ids past the tokenizer (a padded head's rows) are never
sampled.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

from .data import to_device
from .decode import Decoding, Sampling, decode, row_generators
from .distributed import all_reduce_max, all_reduce_sum, side_size
from .records import IGNORE_INDEX, Sample
from .tokenizer_compat import end_of_turn_id


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]  # every token that ends a response (all EOS ids, the template's end of turn)
    max_len: int  # prompt + response never exceed it
    pad_id: int
    gather_once: bool = True  # the whole student gathered for the whole generate; False: FSDP re-gathers per token
    vocab_size: int | None = None  # the tokenizer's length: head rows from it on are padding, never sampled
    check_every: int = 16  # tokens between reads of the stop flags (`decode`)
    compile: bool = False  # torch.compile the decode forward (CUDA graphs on CUDA)


def stop_token_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, the generation config's EOS ids (Qwen lists two), and
    the special token the chat template closes an assistant turn with (Phi-3's `<|end|>`, ChatML's `<|im_end|>`)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)} - {None}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return tuple(sorted(ids))


def prompt_of(sample: Sample) -> list[int]:
    """The tokens before the sample's last trained span: the prompt its last response answers."""
    start = max(i for i, t in enumerate(sample.targets) if t != IGNORE_INDEX and
                (i == 0 or sample.targets[i - 1] == IGNORE_INDEX))
    return sample.input_ids[:start + 1]


def with_response(prompt: list[int], response: list[int]) -> Sample:
    """A sample that trains on `response` after `prompt`."""
    ids = prompt + response
    targets = [IGNORE_INDEX] * len(ids)
    targets[len(prompt) - 1:len(ids) - 1] = response
    return Sample(ids, targets)


@contextmanager
def gathered(root, every_unit: bool = True):
    """The student gathered for a stretch of forwards that `root`'s own forward does not wrap (`decode`).

    The root unit (embeddings, norm, head, which FSDP gathers in the root's forward) is gathered for the whole block.
    With `every_unit`, so are the decoder layers: FSDP would otherwise gather each layer again (and free it) at every
    forward, i.e. for every generated token. That per-token way is slower but holds one layer at a time, for a
    student too big to hold whole (`generate_gather_once: false`). Everything is resharded at the end."""
    root(lambda lm: None)  # a root forward that computes nothing: FSDP's lazy init, which must come from the root
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    held = units if every_unit else [root]
    for unit in held:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in held:
            unit.set_reshard_after_forward(unit in root.resharding_units, recurse=False)
        for unit in units:
            unit.reshard()


@torch.no_grad()
def generate(root, prompts: list[list[int]], settings: GenerationSettings, seeds: list[int],
             device: torch.device) -> tuple[list[list[int]], float]:
    """(responses, seconds): each prompt's sampled continuation, cut after its first stop token (kept) or at
    `max_new_tokens` (or where its prompt + response reaches max_len: each row's own budget, so a long prompt in the
    batch does not shorten the others). Left-padded batch, static KV cache, no gradients, no host sync per token
    (`decode`); row r samples from its own stream seeded with `seeds[r]`, so its response does not depend on the
    other rows of the batch."""
    started = time.perf_counter()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), settings.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    budgets = [max(1, min(settings.max_new_tokens, settings.max_len - len(prompt))) for prompt in prompts]
    budget = max(budgets)
    together = must_step_together(settings)
    new_tokens = int(all_reduce_max(to_device(torch.tensor([budget]), device))) if together else budget  # once
    lm, was_training = root.lm, root.lm.training
    lm.eval()
    try:
        with gathered(root, settings.gather_once):
            tokens = decode(lm, to_device(ids, device), to_device(mask, device),
                            Decoding(new_tokens, settings.stop_ids, settings.pad_id, settings.check_every,
                                     settings.compile),
                            Sampling(settings.temperature, settings.top_p, settings.vocab_size),
                            row_generators(seeds, device), all_ranks_done if together else None)
    finally:
        lm.train(was_training)
    responses = [cut_at_stop(row[:b], settings.stop_ids) for row, b in zip(tokens[:, :budget].tolist(), budgets)]
    return responses, time.perf_counter() - started


def cut_at_stop(tokens: list[int], stop_ids) -> list[int]:
    """A response up to and with its first stop token; all of it when it has none."""
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]


def all_ranks_done(flags: torch.Tensor) -> bool:
    """Whether every row of every rank has stopped: one all-reduce per stop check, for ranks that must step
    together."""
    return int(all_reduce_sum((~flags).sum().reshape(1))) == 0


def must_step_together(settings: GenerationSettings) -> bool:
    """Whether every rank must run as many forwards as the longest generation of any rank: when FSDP gathers layers
    per token (`gather_once` false), each forward is a collective, so a rank whose responses have all ended keeps
    joining them, and all ranks take the largest token budget of any rank (trimming their own responses to theirs).
    Gathered once, a forward is local, and a rank that is done goes on without a collective."""
    return not settings.gather_once and side_size() > 1


@dataclass
class GenerationStats:
    micro_batches: int = 0  # on-policy micro-batches of this rank's step
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped: int = 0  # responses that end with a stop token (the others ran out of budget)


class OnPolicy:
    """Chooses a step's on-policy micro-batches and replaces their responses with the student's own."""

    def __init__(self, ratio: float, seed: int, settings: GenerationSettings, rank: int, device: torch.device,
                 retokenize=None):
        self.ratio, self.seed, self.settings, self.rank, self.device = ratio, seed, settings, rank, device
        self.retokenize = retokenize  # a teacher's own token rows (`cross_tokenizer.TeacherTokenization`, `privileged`)

    def chosen(self, step: int, index: int) -> bool:
        """Whether micro-batch `index` of `step` is on-policy: a draw from (seed, step, index), so every rank agrees
        (their generations start with a collective gather) and a resumed run draws the same."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + index)
        return bool(torch.rand(1, generator=g) < self.ratio)

    def rewrite(self, root, step: int, groups: list[list[Sample]]) -> tuple[list[list[Sample]], list[bool],
                                                                            GenerationStats]:
        """The step's micro-batches with the student's responses in the chosen ones: all of them generated in one
        batch (the student gathered once), each row from its own stream (`row_seed`), so a response depends on
        (seed, step, micro-batch, rank, row) only, not on how the rows were batched. Every rank agrees on which
        micro-batches are chosen, so every rank generates (a collective gather) or none does."""
        flags = [self.chosen(step, i) for i in range(len(groups))]
        chosen = [i for i, on in enumerate(flags) if on]
        if not chosen:
            return groups, flags, GenerationStats()
        prompts = [prompt_of(s) for i in chosen for s in groups[i]]
        seeds = [row_seed(self.seed, step, i, self.rank, row) for i in chosen for row in range(len(groups[i]))]
        responses, seconds = generate(root, prompts, self.settings, seeds, self.device)
        samples = [with_response(p, r) for p, r in zip(prompts, responses)]
        if self.retokenize is not None:  # host string work, about a millisecond a sample (docs/cross_tokenizer.md)
            originals = [s for i in chosen for s in groups[i]]
            samples = [dataclasses.replace(s, **self.retokenize.rewritten(old, s))
                       for old, s in zip(originals, samples)]
        out, taken = list(groups), 0
        for i in chosen:
            out[i], taken = samples[taken:taken + len(groups[i])], taken + len(groups[i])
        stopped = sum(bool(r) and r[-1] in self.settings.stop_ids for r in responses)
        stats = GenerationStats(len(chosen), len(prompts), sum(map(len, responses)), seconds, stopped)
        return out, flags, stats


def row_seed(seed: int, step: int, micro_batch: int, rank: int, row: int) -> int:
    """The seed of one row's sampling stream, from the run's seed and where the row is: a resumed run draws the same."""
    return (((((seed * 1_000_003 + step) * 1009 + micro_batch) * 131 + rank) * 8191 + row)) % 2 ** 63


def on_policy_metrics(metrics: dict, kl_on: float, kd_tokens_on: float, on_batches: float, batches: float,
                       sequences: float, generated: float, seconds: float, stopped: float,
                       world_size: int) -> dict[str, float]:
    """The on-policy share of micro-batches, what generation did (with the share of responses that ended with a stop
    token), and the KL on and off the student's own text, each per token with a KD term (`kd_tokens_on` of them
    on-policy), as the step's KL is (`step_metrics.KD_ROW_MEANS`)."""
    out = {"on_policy_share": on_batches / max(batches, 1.0),
           "generated_len": generated / max(sequences, 1.0),
           "generated_stop_share": stopped / max(sequences, 1.0),
           "gen_tokens_per_sec": generated / max(seconds / world_size, 1e-9) if generated else 0.0}
    kl_key = next((k for k in ("kl", "kl_buckets", "kl_estimate", "kl_shared_buckets") if k in metrics), None)
    if kl_key is not None:
        tokens_off = metrics["kd_tokens"] - kd_tokens_on
        if kd_tokens_on:
            out["kl_on_policy"] = kl_on / kd_tokens_on
        if tokens_off:
            out["kl_off_policy"] = (metrics[kl_key] * metrics["kd_tokens"] - kl_on) / tokens_off
    return out
