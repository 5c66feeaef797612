"""What each model family does after its output head, as one `Head` description read off the model.

The loss kernel computes logits from the last hidden state and the head weight in vocabulary chunks, so it must know
everything the model's own forward applies after `h·Wᵀ`. A family that adds something is one entry of
`LOGIT_TRANSFORMS`: the config attribute that turns it on, in which family, and how it changes the head.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .kernel import Head, matmul_fp32

ANY_FAMILY = "*"

# (model_type, config attribute) → the Head fields it sets, given its value (None or 0 leaves the head plain). One
# attribute name can mean different things in different families — Granite divides its logits by `logits_scaling`,
# HyperCLOVA X multiplies them by it — so a family's own entry wins over the ANY_FAMILY one. A family that uses a name
# in yet another way and has no entry of its own is refused by `verify_head`, not trained on the wrong logits.
LOGIT_TRANSFORMS = {
    (ANY_FAMILY, "final_logit_softcapping"): lambda v: {"softcap": float(v)},  # Gemma-2, Gemma-3: cap·tanh(z / cap)
    (ANY_FAMILY, "logit_scale"): lambda v: {"scale": float(v)},  # Cohere, Cohere2: z · logit_scale
    (ANY_FAMILY, "logits_scaling"): lambda v: {"scale": 1.0 / float(v)},  # Granite, GraniteMoE: z / logits_scaling
    ("hyperclovax", "logits_scaling"): lambda v: {"scale": float(v)},  # HyperCLOVA X: z · logits_scaling
    ("falcon_h1", "lm_head_multiplier"): lambda v: {"scale": float(v)},  # Falcon-H1: z · lm_head_multiplier
}


def head_config(config) -> dict:
    """The Head fields (softcap, scale) that a model config asks for. Multimodal configs keep the language
    model's settings, and its model_type, in `text_config`."""
    config = getattr(config, "text_config", None) or config
    family = getattr(config, "model_type", None)
    fields: dict = {}
    for attribute in dict.fromkeys(attribute for _, attribute in LOGIT_TRANSFORMS):
        value = getattr(config, attribute, None)
        to_fields = LOGIT_TRANSFORMS.get((family, attribute)) or LOGIT_TRANSFORMS.get((ANY_FAMILY, attribute))
        if value and to_fields is not None:
            fields.update(to_fields(value))
    return fields


def output_head(lm: nn.Module) -> Head:
    """The model's output head as the loss kernel reads it: weight, bias (Phi-1/2 have one) and logit transforms."""
    linear = lm.get_output_embeddings()
    return Head(linear.weight, getattr(linear, "bias", None), **head_config(lm.config))


def verify_head(lm: nn.Module, role: str, vocab_size: int, device: torch.device | None = None,
                probe_tokens: int = 8) -> float:
    """Refuses a model whose own logits differ from what the kernel computes from its hidden states and `Head`.

    Runs the model's forward on a short probe (inside the FSDP root's forward, with the head gathered) and compares
    `lm(ids).logits` with the kernel's `finish(h·Wᵀ)` on `base_model(ids).last_hidden_state`. A family that applies
    anything after its head that no `LOGIT_TRANSFORMS` entry describes fails here, before training, instead of
    silently distilling the wrong distribution. The tolerance allows for bf16 compute, whose model logits are
    rounded to bf16 while the kernel's are fp32. Returns the relative difference."""
    device = device or lm.get_input_embeddings().weight.device  # pass the compute device for an offloaded model
    ids = ((torch.arange(probe_tokens) * 7 + 3) % vocab_size)[None].to(device)
    with torch.no_grad():
        head = output_head(lm)  # computed first: the model's own forward may reshard a head of its own unit
        hidden = lm.base_model(input_ids=ids).last_hidden_state[0]
        ours = head.finish(matmul_fp32(hidden, head.weight[:vocab_size].t()),
                           None if head.bias is None else head.bias[:vocab_size])
        logits = lm(input_ids=ids).logits
    theirs = logits[0, :, :vocab_size].float()
    difference = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-6))
    exact = logits.dtype == torch.float32 and hidden.dtype == torch.float32
    if difference > (1e-4 if exact else 3e-2):
        raise ConfigError(
            f"the {role} ({getattr(lm.config, 'model_type', type(lm).__name__)}) computes logits that the loss kernel "
            f"does not reproduce (relative difference {difference:.2g} on a probe): its forward applies something after "
            "the output head beyond a bias, a logit scale and a soft-cap, so this family is not supported yet")
    return difference


def probe_head(root, role: str, vocab_size: int, device: torch.device) -> None:
    """`verify_head` on a sharded model (a `sharding.ShardedCausalLM`): run inside its forward with the head
    gathered, then every unit resharded."""
    with root.gathered_head():
        root(verify_head, role, vocab_size, device)
    root.reshard_everything()
