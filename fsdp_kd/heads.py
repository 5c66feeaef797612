"""What each model family does after its output head, as one `Head` description read off the model.

The loss kernel computes logits from the last hidden state and the head weight in vocabulary chunks, so it must know
everything the model's own forward applies after `h·Wᵀ`. A family that adds something is one entry of
`LOGIT_TRANSFORMS`: the config attribute that turns it on and how it changes the head.
"""

from __future__ import annotations

from torch import nn

from .loss import Head

# config attribute → the Head fields it sets, given its value (None or 0 leaves the head plain)
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": lambda v: {"softcap": float(v)},  # Gemma-2, Gemma-3: cap·tanh(z / cap)
    "logit_scale": lambda v: {"scale": float(v)},  # Cohere, Cohere2: z · logit_scale
    "logits_scaling": lambda v: {"scale": 1.0 / float(v)},  # Granite, GraniteMoE: z / logits_scaling
}


def head_config(config) -> dict:
    """The Head fields (softcap, scale) that a model config asks for. Multimodal configs keep the language
    model's settings in `text_config`."""
    config = getattr(config, "text_config", None) or config
    fields: dict = {}
    for attribute, to_fields in LOGIT_TRANSFORMS.items():
        value = getattr(config, attribute, None)
        if value:
            fields.update(to_fields(value))
    return fields


def output_head(lm: nn.Module) -> Head:
    """The model's output head as the loss kernel reads it: weight, bias (Phi-1/2 have one) and logit transforms."""
    linear = lm.get_output_embeddings()
    return Head(linear.weight, getattr(linear, "bias", None), **head_config(lm.config))
