"""On-policy distillation: generation under FSDP2 equals HF generate, responses end at stop tokens, the step trains
only on them at λ = 1, and prompts, responses and stop tokens are taken apart right."""

import pytest
import torch

from fsdp_kd.tokenizer_compat import load_tokenizer
from fsdp_kd.on_policy import prompt_of, stop_token_ids, with_response
from fsdp_kd.records import IGNORE_INDEX, make_sample

from assets import real_asset
from conftest import REPO, read_metrics, torchrun, train_args

WORKER = str(REPO / "tests" / "dist_worker.py")
TRAIN = str(REPO / "train.py")


def test_prompt_and_response_of_a_sample():
    sample = make_sample([5, 6, 7], [8, 9])
    assert prompt_of(sample) == [5, 6, 7]
    rewritten = with_response([5, 6, 7], [20, 21, 2])
    assert rewritten.input_ids == [5, 6, 7, 20, 21, 2]
    assert rewritten.targets == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 2, IGNORE_INDEX]


def test_the_prompt_of_a_multiturn_sample_ends_before_its_last_response():
    ids = list(range(10, 20))
    targets = [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 17, 18, 19, IGNORE_INDEX]
    from fsdp_kd.records import Sample

    assert prompt_of(Sample(ids, targets)) == ids[:7]  # position 6 predicts 17, the last response's first token


def test_one_generation_per_step_split_back_into_its_micro_batches(monkeypatch):
    """OnPolicy.rewrite generates once for all of a step's chosen micro-batches, each row with the seed of its
    (step, micro-batch, rank, row), and hands each chosen micro-batch its own rows back; the others are untouched."""
    import fsdp_kd.on_policy as on_policy
    from fsdp_kd.on_policy import GenerationSettings, OnPolicy, row_seed

    calls = []

    def fake_generate(root, prompts, settings, seeds, device):
        calls.append(len(prompts))
        return [[p[0], seed % 1000] + [2] * (seed % 2) for p, seed in zip(prompts, seeds)], 0.5  # odd seeds stop

    monkeypatch.setattr(on_policy, "generate", fake_generate)
    settings = GenerationSettings(8, 1.0, 1.0, (2,), 64, 0)
    policy = OnPolicy(0.5, seed=3, settings=settings, rank=1, device=torch.device("cpu"))
    groups = [[make_sample([10 * i + j, 5], [7]) for j in range(3)] for i in range(6)]
    out, flags, stats = policy.rewrite(None, 4, groups)
    chosen = [i for i, on in enumerate(flags) if on]
    assert 0 < len(chosen) < len(groups) and calls == [3 * len(chosen)]
    for i, group in enumerate(out):
        if i not in chosen:
            assert group is groups[i]
            continue
        for j, sample in enumerate(group):
            seed = row_seed(3, 4, i, 1, j)
            assert sample.input_ids == [10 * i + j, 5, 10 * i + j, seed % 1000] + [2] * (seed % 2)
    stopped = sum(row_seed(3, 4, i, 1, j) % 2 for i in chosen for j in range(3))
    assert 0 < stopped < 3 * len(chosen)
    assert (stats.micro_batches, stats.sequences, stats.tokens, stats.seconds, stats.stopped) == (
        len(chosen), 3 * len(chosen), 6 * len(chosen) + stopped, 0.5, stopped)
    assert len({row_seed(3, 4, i, r, j) for i in range(6) for r in range(2) for j in range(3)}) == 36


@pytest.mark.parametrize("name,expected", [("tok_qwen2.5_instruct", {"<|im_end|>"}),
                                           ("tok_phi3_mini_instruct", {"<|end|>", "<|endoftext|>"}),
                                           ("tok_smollm_360m_instruct", {"<|im_end|>"})])
def test_every_stop_token_of_real_tokenizers(name, expected):
    tok = load_tokenizer(str(real_asset(name)), False)
    stops = {tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)}
    assert expected <= stops, stops

    class QwenGenerationConfig:  # Qwen's generation_config.json lists <|im_end|> and <|endoftext|>
        eos_token_id = [151645, 151643]

    if name.startswith("tok_qwen"):
        assert set(stop_token_ids(tok, QwenGenerationConfig)) >= {151645, 151643}


def test_generation_under_fsdp2_equals_hf_generate_and_stops_at_stop_tokens(tiny, tmp_path):
    """2 ranks, the student sharded: sampled responses equal single-process HF generate on the same weights with
    the same seed, gathered once or re-gathered per token; each ends at its first stop token or the length limit.
    At λ = 1 every micro-batch is rewritten to train on exactly its generated response."""
    out = tmp_path / "gen.pt"
    torchrun([WORKER, "generate", str(out), *train_args(tiny, tmp_path / "run", on_policy_ratio=1.0,
                                                        generate_max_new_tokens=10)])
    ranks = torch.load(out, weights_only=False)
    assert len(ranks) == 2
    for r in ranks:
        assert r["once"] == r["reference"] == r["per_token"]
        for response in r["once"]:
            assert 1 <= len(response) <= r["max_new_tokens"]
            assert not set(response[:-1]) & set(r["stop_ids"])
        assert any(resp[-1] in r["stop_ids"] for resp in r["once"]) or all(len(x) == 10 for x in r["once"])
        assert r["flags"] == [True] * 4
        for group in r["rewritten"]:
            for ids, targets in group:
                trained = [t for t in targets if t != IGNORE_INDEX]
                assert trained and ids[-len(trained):] == trained  # only the generated tail is trained
    assert ranks[0]["once"] != ranks[1]["once"]  # different prompts and seeds per rank


def biased_student(tiny, path, padded_rows: int, eos_bias: float) -> int:
    """Saves to `path` a Phi student (its head has a bias) whose embedding has `padded_rows` rows past its tokenizer's
    length (Qwen's has 271) and whose head favours them (+8) and <eos> (`eos_bias`); returns the tokenizer's length."""
    from transformers import PhiConfig, PhiForCausalLM

    tok = load_tokenizer(tiny["tok"], False)
    config = PhiConfig(vocab_size=len(tok) + padded_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(5)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        bias = model.get_output_embeddings().bias
        bias.zero_()
        bias[len(tok):] = 8.0
        bias[tok.eos_token_id] = eos_bias
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return len(tok)


def test_the_student_never_samples_a_padded_head_row(tiny, tmp_path):
    """Ids at or past the tokenizer's length are not tokens: on-policy generation gives them no probability, gathered
    once or per token, even from a head that favours them (HF generate on the same weights, the control, samples
    them), and samples what HF generate with those rows masked samples."""
    path = tmp_path / "student"
    tokens = biased_student(tiny, path, padded_rows=51, eos_bias=0.0)
    out = tmp_path / "gen.pt"
    torchrun([WORKER, "generate", str(out), *train_args(tiny, tmp_path / "run", pretrain=path, on_policy_ratio=1.0,
                                                        generate_max_new_tokens=10)])
    for r in torch.load(out, weights_only=False):
        assert any(t >= tokens for response in r["unmasked"] for t in response)
        assert r["once"] == r["reference"] == r["per_token"]
        sampled = [t for response in r["once"] + r["per_token"] for t in response]
        sampled += [t for group in r["rewritten"] for ids, _ in group for t in ids]
        assert sampled and max(sampled) < tokens, sorted(set(sampled))[-5:]


def test_ranks_generating_per_token_stay_in_step(tiny, tmp_path):
    """generate_gather_once false gathers each layer for every token, a collective, so a rank whose responses have
    all ended must keep stepping until every rank's have (`must_step_together`: a global token budget and an
    all-reduce at each stop check). Ranks whose responses end at different lengths finish, with the responses of
    the gathered-once path."""
    path = tmp_path / "student"
    biased_student(tiny, path, padded_rows=0, eos_bias=3.0)  # responses end at varied lengths
    out = tmp_path / "gen.pt"
    torchrun([WORKER, "generate", str(out), *train_args(tiny, tmp_path / "run", pretrain=path, on_policy_ratio=1.0,
                                                        generate_max_new_tokens=30, dist_timeout_minutes=1,
                                                        generate_stop_check_every=2)])
    ranks = torch.load(out, weights_only=False)
    assert all(r["per_token"] == r["once"] for r in ranks)
    longest = [max(map(len, r["per_token"])) for r in ranks]
    assert longest[0] != longest[1], longest  # one rank ended first and had to keep stepping


@pytest.mark.parametrize("divergence", [{"kd_loss": "reverse_kl"},
                                        {"kd_loss": "reverse_kl_student_topk", "student_topk": 4}])
def test_lambda_one_trains_on_generated_text_with_no_ce_and_logs_generation(tiny, tmp_path, divergence):
    torchrun([TRAIN, *train_args(tiny, tmp_path / "out", on_policy_ratio=1.0, generate_max_new_tokens=8,
                                 kd_coef=0.5, logging_steps=1, max_steps=2, generate_gather_once="false",
                                 **divergence)])
    for m in read_metrics(tmp_path / "out"):
        assert m["on_policy_share"] == 1.0 and 1 <= m["generated_len"] <= 8 and m["gen_tokens_per_sec"] > 0
        assert 0.0 <= m["generated_stop_share"] <= 1.0
        assert m["loss"] == pytest.approx(0.5 * m["kd"], rel=1e-5)  # the CE term is off on self-generated text
        assert m["kl_on_policy"] == pytest.approx(m["kl"], rel=1e-5) and "kl_off_policy" not in m


def test_responses_that_all_stop_at_once_log_a_stop_share_of_one(tiny, tmp_path):
    """A student whose head all but always says <eos>: every response is that one token, and the step's reduced
    counts say so (generated_len 1, generated_stop_share 1), on 2 ranks."""
    path = tmp_path / "student"
    biased_student(tiny, path, padded_rows=0, eos_bias=60.0)
    torchrun([TRAIN, *train_args(tiny, tmp_path / "out", pretrain=path, on_policy_ratio=1.0, generate_max_new_tokens=8,
                                 logging_steps=1, max_steps=2)])
    for m in read_metrics(tmp_path / "out"):
        assert (m["generated_len"], m["generated_stop_share"]) == (1.0, 1.0), m


def test_lambda_zero_is_the_off_policy_run(tiny, tmp_path):
    torchrun([TRAIN, *train_args(tiny, tmp_path / "default", max_steps=2, logging_steps=1)], nproc=1)
    torchrun([TRAIN, *train_args(tiny, tmp_path / "zero", max_steps=2, logging_steps=1, on_policy_ratio=0.0)], nproc=1)
    drop = ("tokens_per_sec", "peak_mem_gb")
    assert [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(tmp_path / "zero")] == \
        [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(tmp_path / "default")]


def test_a_killed_on_policy_run_resumes_bitwise(tiny, tmp_path):
    """λ = 0.5: the resumed run draws the same on-policy micro-batches and samples the same responses (seeded per
    step, micro-batch and rank), so its metrics and final weights equal an uninterrupted run's exactly."""
    from safetensors.torch import load_file

    from conftest import start_torchrun, wait_for
    from test_checkpoint import comparable, kill_everything, resume_args

    def args(save):
        return [TRAIN, *resume_args(tiny, save, max_steps=8, on_policy_ratio=0.5, generate_max_new_tokens=8,
                                    kd_loss="reverse_kl")]

    torchrun(args(tmp_path / "reference"))
    proc = start_torchrun(args(tmp_path / "run"))
    wait_for(tmp_path / "run" / "checkpoints" / "step_4", proc)
    kill_everything(proc)
    assert not (tmp_path / "run" / "config.json").exists(), "the run finished before the kill"
    assert "resumed from" in torchrun(args(tmp_path / "run")).stdout
    resumed, reference = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "reference")
    assert comparable(resumed) == comparable(reference)
    assert 0 < sum(m["on_policy_share"] for m in reference) < len(reference)  # both kinds of micro-batch ran
    final = load_file(tmp_path / "run" / "model-00001-of-00001.safetensors")
    expected = load_file(tmp_path / "reference" / "model-00001-of-00001.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_the_end_of_turn_is_read_from_the_template_only():
    """A template that refuses an exchange without a system message is read with one; without a template there is no
    end of turn (the EOS ends a document, another role: cross_tokenizer must not map it to a teacher's end of turn),
    and generation still stops at the EOS."""
    from fsdp_kd.tokenizer_compat import end_of_turn_id

    tok = load_tokenizer(str(real_asset("tok_phi3_mini_instruct")), False)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == "<|end|>"
    tok.chat_template = None
    assert end_of_turn_id(tok) is None and stop_token_ids(tok) == (tok.eos_token_id,)
