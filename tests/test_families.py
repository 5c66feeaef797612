"""The support matrix: for every model family, the kernel's CE, teacher CE and KL equal what HF's own
`model(input_ids).logits` give, and the FSDP export reproduces the trained model's logits.

Tiny random models are built from each family's config class. Heads are scaled up so that soft-capping and logit
scales change the distribution noticeably, and head biases are made non-zero, so a kernel that ignored them fails.
Run with `-s` to see the table of maximum relative errors.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from conftest import REPO, torchrun

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family_configs() -> dict:
    """family → (config class name, extra config fields, what is special)."""
    return {
        "llama": ("LlamaConfig", {}, "plain head"),
        "mistral": ("MistralConfig", {}, "plain head"),
        "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "tied embeddings"),
        "qwen3": ("Qwen3Config", {"head_dim": 8}, "q/k norms"),
        "phi3": ("Phi3Config", {}, "fused qkv"),
        "phi": ("PhiConfig", {}, "head bias"),
        "gemma2": ("Gemma2Config", {"final_logit_softcapping": 3.0, "head_dim": 8}, "logit soft-capping"),
        "gemma3": ("Gemma3TextConfig", {"final_logit_softcapping": 3.0, "head_dim": 8}, "logit soft-capping"),
        "granite": ("GraniteConfig", {"logits_scaling": 4.0}, "logits divided by logits_scaling"),
        "hyperclovax": ("HyperCLOVAXConfig", {"logits_scaling": 0.25}, "logits times logits_scaling"),
        "falcon_h1": ("FalconH1Config", {"lm_head_multiplier": 0.25, "mamba_d_ssm": None, "mamba_n_heads": 8,
                                         "mamba_d_state": 16, "head_dim": 8},
                      "attention/Mamba-2 hybrid, logits times lm_head_multiplier"),
        "cohere": ("CohereConfig", {"logit_scale": 0.25}, "logits times logit_scale"),
        "olmo2": ("Olmo2Config", {}, "post-norms"),
        "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                         "shared_expert_intermediate_size": 16}, "MoE"),
        "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                         "head_dim": 8}, "MoE"),
        "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, "MoE"),
    }


FAMILIES = family_configs()


def build(family: str, seed: int, hidden: int = 32, head_scale: float = 8.0):
    import transformers

    class_name, extra, _ = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**COMMON, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                                                  **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(head_scale)  # opinions large enough for soft-capping and scales to matter
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(torch.randn(head.bias.shape) * 2)
    return model


def batch_of(seed: int = 0):
    from fsdp_kd.data import collate
    from fsdp_kd.records import make_sample

    g = torch.Generator().manual_seed(seed)
    samples = [make_sample(torch.randint(3, V, (p,), generator=g).tolist(), torch.randint(3, V, (r,), generator=g).tolist())
               for p, r in ((4, 9), (6, 5), (3, 12))]
    return collate(samples, pad_id=0)


ERRORS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def print_matrix():
    yield
    if ERRORS:
        print("\n| family | CE | teacher CE | KL | export logits |\n|---|---|---|---|---|")
        for family in FAMILIES:
            e = ERRORS.get(family, {})
            print(f"| {family} | " + " | ".join(f"{e[k]:.1e}" if k in e else "—"
                                             for k in ("ce", "teacher_ce", "kl", "export")) + " |")


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_equals_the_models_own_logits(family):
    import torch.nn.functional as F

    from fsdp_kd.distill import hidden_at_targets, student_loss
    from fsdp_kd.heads import output_head
    from fsdp_kd.targets import LiveTargets
    from fsdp_kd.loss import LossSpec

    student, teacher = build(family, seed=1, hidden=32), build(family, seed=2, hidden=48, head_scale=12.0)
    batch = batch_of()
    spec = LossSpec(kd_coef=0.5, token_chunk=5, vocab_chunk=16)
    with torch.no_grad():
        targets = nullcontext(LiveTargets(hidden_at_targets(teacher, batch), output_head(teacher)))
        _, metrics = student_loss(student, batch, spec, V, targets)
        rows = batch.target_rows
        z_s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.flatten(0, 1)[rows]
        z_t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.flatten(0, 1)[rows]
        log_q, log_p = F.log_softmax(z_s.double(), -1), F.log_softmax(z_t.double(), -1)
        y = batch.target_ids
        expected = {"ce": -log_q.gather(1, y[:, None]).sum(), "teacher_ce": -log_p.gather(1, y[:, None]).sum(),
                    "kl": (log_p.exp() * (log_p - log_q)).sum()}
    errors = {name: relative(float(metrics[name]), float(value)) for name, value in expected.items()}
    ERRORS.setdefault(family, {}).update(errors)
    assert expected["kl"] > 0.1  # the two models disagree: the KL tests something
    for name, error in errors.items():
        assert error < 1e-5, (family, name, float(metrics[name]), float(expected[name]))


def test_exports_reproduce_the_trained_models_logits(tmp_path):
    """One torchrun over every family: shard, train one step (bias and soft-capped head included), export, and
    compare `from_pretrained` on the export with the FSDP model's own logits."""
    paths = []
    for family in FAMILIES:
        path = tmp_path / family
        build(family, seed=3).save_pretrained(path)
        paths.append(f"{family}={path}")
    out = tmp_path / "errors.pt"
    torchrun([str(REPO / "tests" / "dist_worker.py"), "families", str(out), *paths], timeout=600)
    errors = torch.load(out, weights_only=True)
    for family, error in errors.items():
        ERRORS.setdefault(family, {})["export"] = error
    assert set(errors) == set(FAMILIES)
    assert all(error < 1e-5 for error in errors.values()), errors


def test_a_head_the_kernel_cannot_reproduce_is_refused():
    """A family that transforms its logits in a way no Head describes is refused, with one line."""
    from fsdp_kd.errors import ConfigError
    from fsdp_kd.heads import verify_head

    model = build("llama", seed=4)
    verify_head(model, "student", V)  # a plain head passes
    original = model.forward

    def forward_with_a_twist(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0 + 1.0  # an unknown transform
        return out

    model.forward = forward_with_a_twist
    with pytest.raises(ConfigError, match=r"student .* logits that the loss kernel does not reproduce"):
        verify_head(model, "student", V)


def test_head_description_is_read_from_the_config():
    from fsdp_kd.heads import output_head

    assert output_head(build("gemma2", 0)).softcap == 3.0
    assert output_head(build("granite", 0)).scale == 0.25
    assert output_head(build("cohere", 0)).scale == 0.25
    # one attribute name, two meanings: Granite divides by logits_scaling, HyperCLOVA X multiplies by it
    assert output_head(build("hyperclovax", 0)).scale == 0.25
    assert output_head(build("falcon_h1", 0)).scale == 0.25
    assert output_head(build("phi", 0)).bias is not None
    plain = output_head(build("llama", 0))
    assert plain.bias is None and plain.scale == 1.0 and plain.softcap is None
    assert not math.isnan(plain.scale)


def test_packing_is_refused_for_a_model_with_recurrent_layers(tmp_path):
    """Falcon-H1's Mamba layers carry state across a packed row's samples, which no mask stops."""
    from fsdp_kd.config import TrainConfig
    from fsdp_kd.errors import ConfigError
    from fsdp_kd.preflight import check_packing, run_paths

    for family in ("falcon_h1", "llama", "gemma3"):
        build(family, 0).config.save_pretrained(tmp_path / family)
    cfg = TrainConfig(pretrain=str(tmp_path / "llama"), teacher_model=str(tmp_path / "falcon_h1"),
                      dataset="x.jsonl", packing_samples=True)
    with pytest.raises(ConfigError, match=r"key packing_samples: teacher_model \(falcon_h1\) has recurrent layers"):
        check_packing(run_paths(cfg), cfg.packing_samples)
    check_packing(run_paths(TrainConfig(pretrain=str(tmp_path / "llama"), teacher_model=str(tmp_path / "gemma3"),
                                        dataset="x.jsonl")), packing_samples=True)
    check_packing(run_paths(TrainConfig(pretrain=str(tmp_path / "falcon_h1"), dataset="x.jsonl", kd_coef=0.0)),
                  packing_samples=False)  # unpacked
