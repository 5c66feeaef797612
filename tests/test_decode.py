"""The decoding loop (`fsdp_kd.decode`) against transformers' `generate`, the previous on-policy path: the same greedy
tokens on every supported family and on real tokenizers, the same sampled tokens as a batch of one seeded alike,
responses that do not depend on how rows are batched, stop tokens handled, and no host sync per generated token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fsdp_kd.decode import Decoding, Sampling, decode, row_generators
from fsdp_kd.on_policy import GenerationSettings, cut_at_stop
from fsdp_kd.testing.profiling import SyncDetector
from fsdp_kd.testing.reference import hf_generate

from assets import real_asset
from test_families import FAMILIES, V, build

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21]]


def settings(**kw) -> GenerationSettings:
    base = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, stop_ids=(2,), max_len=64, pad_id=0, vocab_size=None,
                check_every=4)
    return GenerationSettings(**{**base, **kw})


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def ours(lm, prompts, s: GenerationSettings, seeds=None, all_done=None) -> list[list[int]]:
    """`decode`'s responses, cut at their stop tokens as `on_policy.generate` cuts them."""
    ids, mask = left_padded(prompts, s.pad_id)
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    tokens = decode(lm, ids, mask, Decoding(s.max_new_tokens, s.stop_ids, s.pad_id, s.check_every),
                    Sampling(s.temperature, s.top_p, s.vocab_size), row_generators(seeds, ids.device), all_done)
    return [cut_at_stop(row, s.stop_ids) for row in tokens.tolist()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_decoding_equals_transformers_generate(family):
    """fp32, CPU, left-padded prompts of four lengths: token for token what `generate` (dynamic cache) writes."""
    lm = build(family, seed=1)
    s = settings()
    assert ours(lm, PROMPTS, s) == hf_generate(lm, PROMPTS, s, seed=0)


def tiny_phi(vocab: int, seed: int = 3, head_bias: dict[int, float] | None = None):
    """A tiny Phi (its head has a bias): `head_bias` pushes tokens up (a model that emits its stop token) or down (one
    that never does)."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=2,
                       bos_token_id=None)
    torch.manual_seed(seed)
    lm = PhiForCausalLM(config).eval()
    with torch.no_grad():
        head = lm.get_output_embeddings()
        head.weight.mul_(20.0)  # opinions sharp enough that samples are not uniform
        head.bias.zero_()
        for token, bias in (head_bias or {}).items():
            head.bias[token] = bias
    return lm


@pytest.mark.parametrize("name", ["tok_smollm_360m_instruct", "tok_qwen2.5_instruct"])
def test_real_tokenizer_prompts_greedy_and_sampled(name):
    """Chat-templated prompts of a real tokenizer; Qwen's head is padded past the tokenizer (as Qwen2.5's is). Greedy
    tokens equal `generate`'s; sampled ones (temperature 0.8, top-p 0.9) equal `generate`'s for each prompt alone
    with its row's seed."""
    from fsdp_kd.on_policy import stop_token_ids
    from fsdp_kd.tokenizer_compat import load_tokenizer

    tok = load_tokenizer(str(real_asset(name)), False)
    vocab = len(tok) + (271 if name.startswith("tok_qwen") else 0)
    lm = tiny_phi(vocab)
    questions = ["What is 12 times 7?", "Natalia sold clips to 48 of her friends in April. How many in May?", "Hi"]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for q in questions]
    s = settings(stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id, vocab_size=len(tok), max_new_tokens=4)
    assert ours(lm, prompts, s) == hf_generate(lm, prompts, s, seed=0)
    sampled = dataclasses.replace(s, temperature=0.8, top_p=0.9)
    seeds = [11, 12, 13]
    mine = ours(lm, prompts, sampled, seeds)
    assert mine == [hf_generate(lm, [p], sampled, seed)[0] for p, seed in zip(prompts, seeds)]
    assert all(t < len(tok) for response in mine for t in response)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_draws_what_generate_draws_for_a_row_alone(temperature, top_p):
    """Each row has its own stream: seeded as `generate`'s global generator was for that prompt alone (a batch of
    one, the default micro-batch of the previous path), it draws the same tokens. So `decode` samples from exactly
    `generate`'s distribution, with its Exp(1) race (what `torch.multinomial` does for one sample)."""
    lm = build("qwen2", seed=4, head_scale=2.0)  # a flatter head: draws vary, the sampled tokens are not all argmax
    s = settings(temperature=temperature, top_p=top_p, max_new_tokens=10, check_every=3)
    seeds = [101, 202, 303, 404]
    mine = ours(lm, PROMPTS, s, seeds)
    assert mine == [hf_generate(lm, [p], s, seed)[0] for p, seed in zip(PROMPTS, seeds)]
    assert mine != ours(lm, PROMPTS, dataclasses.replace(s, temperature=0.0))  # sampling, not greedy


def test_a_row_draws_the_same_however_rows_are_batched():
    """A row's response is a function of its prompt and its seed: alone, in a batch, in another order, or beside
    longer prompts (more left padding) it is the same."""
    lm = build("llama", seed=5, head_scale=2.0)
    s = settings(temperature=1.0, max_new_tokens=10)
    seeds = [7, 8, 9, 10]
    together = ours(lm, PROMPTS, s, seeds)
    alone = [ours(lm, [p], s, [seed])[0] for p, seed in zip(PROMPTS, seeds)]
    order = [2, 0, 3, 1]
    shuffled = ours(lm, [PROMPTS[i] for i in order], s, [seeds[i] for i in order])
    wide = ours(lm, PROMPTS[:2] + [list(range(3, 40))], s, seeds[:2] + [99])
    assert together == alone
    assert shuffled == [together[i] for i in order]
    assert wide[:2] == together[:2]
    assert len(set(map(tuple, together))) == len(together)  # different seeds, different draws


def test_each_row_has_its_own_length_budget_under_max_len(monkeypatch):
    """`on_policy.generate`: a prompt near max_len gets the few tokens left to it; the short prompts beside it keep
    their whole max_new_tokens, as each would alone (the budget is a row's, not the batch's longest prompt's)."""
    import types
    from contextlib import nullcontext

    import fsdp_kd.on_policy as on_policy

    monkeypatch.setattr(on_policy, "gathered", lambda root, once: nullcontext())  # one process: nothing sharded
    root = types.SimpleNamespace(lm=build("llama", seed=5, head_scale=2.0))
    s = settings(temperature=1.0, max_new_tokens=10, max_len=24, stop_ids=(-1,))  # no stop: every budget runs out
    prompts, seeds = PROMPTS[:2] + [list(range(3, 23))], [7, 8, 99]
    together, _ = on_policy.generate(root, prompts, s, seeds, torch.device("cpu"))
    alone = [on_policy.generate(root, [p], s, [seed], torch.device("cpu"))[0][0] for p, seed in zip(prompts, seeds)]
    assert together == alone
    assert [len(r) for r in together] == [10, 10, 24 - 20]


def test_a_model_that_emits_its_stop_token_ends_early_and_one_that_never_does_runs_to_the_limit():
    """Responses end with their first stop token, nothing after it; once every row has stopped the loop ends at the
    next check. A model that never emits a stop id writes max_new_tokens for every row."""
    stopping = tiny_phi(97, head_bias={2: 4.0})  # <eos> (2) wins after a token or two
    s = settings(temperature=1.0, max_new_tokens=24, check_every=4)
    ids, mask = left_padded(PROMPTS, 0)
    tokens = decode(stopping, ids, mask, Decoding(24, (2,), 0, 4), Sampling(1.0, 1.0, None),
                    row_generators([1, 2, 3, 4], ids.device))
    assert tokens.shape[1] < 24 and tokens.shape[1] % 4 == 0  # stopped at a check, long before the limit
    responses = ours(stopping, PROMPTS, s, [1, 2, 3, 4])
    for row, response in zip(tokens.tolist(), responses):
        assert response[-1] == 2 and 2 not in response[:-1]
        assert row[len(response):] == [0] * (len(row) - len(response))  # pad after the stop token
    assert responses == [hf_generate(stopping, [p], s, seed)[0] for p, seed in zip(PROMPTS, [1, 2, 3, 4])]
    never = tiny_phi(97, head_bias={2: -1e4})
    never_responses = ours(never, PROMPTS, s)
    assert [len(r) for r in never_responses] == [24] * len(PROMPTS) and all(2 not in r for r in never_responses)


def test_ranks_stepping_together_run_until_every_rank_is_done():
    """With a per-token collective (`all_done` across ranks), a rank whose rows have all stopped keeps stepping as
    long as the other ranks' `all_done` says so, and its responses are unchanged by it."""
    lm = tiny_phi(97, head_bias={2: 4.0})
    s = settings(temperature=1.0, max_new_tokens=24, check_every=2)
    ids, mask = left_padded(PROMPTS, 0)
    alone = decode(lm, ids, mask, Decoding(24, (2,), 0, 2), Sampling(1.0, 1.0, None), row_generators([1, 2, 3, 4],
                                                                                                       ids.device))
    held = decode(lm, ids, mask, Decoding(24, (2,), 0, 2), Sampling(1.0, 1.0, None), row_generators([1, 2, 3, 4],
                                                                                                      ids.device),
                  all_done=lambda flags: False)  # another rank is never done
    assert alone.shape[1] < 24 and held.shape[1] == 24
    assert torch.equal(held[:, :alone.shape[1]], alone) and (held[:, alone.shape[1]:] == 0).all()
    assert ours(lm, PROMPTS, s, [1, 2, 3, 4]) == [cut_at_stop(r, (2,)) for r in held.tolist()]


def syncs_of(lm, new_tokens: int, check_every: int, temperature: float) -> int:
    ids, mask = left_padded(PROMPTS, 0)
    device = torch.device("cpu")
    with SyncDetector() as detector:
        moved = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        decode(lm, *moved, Decoding(new_tokens, (2,), 0, check_every), Sampling(temperature, 0.9, V - 3),
               row_generators([1, 2, 3, 4], device))  # warm-up: placements learned
        moved = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with detector.counting():
            decode(lm, *moved, Decoding(new_tokens, (2,), 0, check_every), Sampling(temperature, 0.9, V - 3),
                   row_generators([1, 2, 3, 4], device))
    return len(detector.events), detector.report()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_host_sync_per_generated_token(temperature):
    """`SyncDetector`: doubling the tokens adds no sync; each stop check is exactly one (the read of the flags)."""
    lm = tiny_phi(V, head_bias={2: -1e4})  # never stops: every run makes all its tokens
    n, report = syncs_of(lm, 4, 100, temperature)
    twice, _ = syncs_of(lm, 8, 100, temperature)
    assert n == twice, report
    checked, report = syncs_of(lm, 8, 3, temperature)
    assert checked == n + 2, report  # reads of the flags after tokens 3 and 6 (8 ends the loop)
