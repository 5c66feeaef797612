"""A student made from its teacher by depth pruning: a subset of the decoder layers, with the embeddings, final norm
and head kept as they are (the usual layer-dropped initialisation, where Minitron-style compression starts).

    python -m fsdp_kd.prune --model TEACHER_DIR --keep 6 --out STUDENT_DIR
    python -m fsdp_kd.prune --model TEACHER_DIR --layers 0,5,11,17,23,29 --out STUDENT_DIR

`--keep N` takes N layers evenly spaced from the first to the last (the first and last layers read the embeddings and
feed the head, so both are kept); `--layers` names them. The result is an ordinary HF directory: the config with
`num_hidden_layers` and the per-layer settings (`layer_types`, ...) of the kept layers, the weights in the dtype they
were saved in (tied embeddings stay tied), the generation config and the tokenizer. It computes exactly what the kept
layers of the original compute, in order.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError

# Config fields with one entry per layer: the student keeps the kept layers' entries.
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type",
                   "num_attention_heads_per_layer", "num_key_value_heads_per_layer")
# Config fields that list layer indices: the student keeps the kept ones, renumbered.
LAYER_INDEX_LISTS = ("mlp_only_layers", "full_attn_idxs")


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over 0 .. n_layers - 1, both ends included."""
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def choose_layers(n_layers: int, layers: str | None, keep: int | None) -> list[int]:
    """The kept layers from `--layers` or `--keep`; one line about what is wrong otherwise."""
    if (layers is None) == (keep is None):
        raise ConfigError("give exactly one of --layers 0,1,... and --keep N")
    if keep is not None:
        if not 1 <= keep <= n_layers:
            raise ConfigError(f"--keep must be between 1 and the model's {n_layers} layers, got {keep}")
        return evenly_spaced(n_layers, keep)
    try:
        chosen = [int(part) for part in layers.split(",")]
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer indices like 0,1,5, got {layers!r}") from None
    if any(not 0 <= i < n_layers for i in chosen):
        raise ConfigError(f"--layers must lie in 0..{n_layers - 1} (the model has {n_layers} layers), got {layers}")
    if chosen != sorted(set(chosen)):
        raise ConfigError(f"--layers must be increasing with no repeats (layers run in order), got {layers}")
    return chosen


def pruned_config(config, kept: list[int]):
    """A copy of `config` for the kept layers. A config with another list of one entry per layer is refused: which
    of its entries belong to which layer is not known here."""
    import copy

    unknown = [name for name, value in config.to_dict().items() if isinstance(value, list)
               and len(value) == config.num_hidden_layers and name not in PER_LAYER_LISTS + LAYER_INDEX_LISTS]
    if unknown:
        raise ConfigError(f"the {config.model_type} config has per-layer lists prune.py does not know "
                          f"({', '.join(unknown)}): add them to PER_LAYER_LISTS or LAYER_INDEX_LISTS in "
                          "fsdp_kd/prune.py")
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(kept)
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)):
            setattr(config, name, [values[i] for i in kept])
    for name in LAYER_INDEX_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)):
            setattr(config, name, [kept.index(i) for i in values if i in kept])
    return config


def layer_list_name(model, n_layers: int) -> str:
    """The state-dict prefix of the decoder layers: the module list of `n_layers` entries (`model.layers` in most
    families)."""
    import torch

    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers]
    if len(names) != 1:
        raise ConfigError(f"cannot tell which module list holds the {n_layers} decoder layers of this "
                          f"{model.config.model_type} model (found {names or 'none'}); prune it by hand")
    return names[0]


def pruned_state_dict(state: dict, prefix: str, kept: list[int]) -> dict:
    """`state` with the layers under `prefix` other than the kept ones dropped and the kept ones renumbered."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(index)]}.{rest}"
        out[key] = value
    return out


def prune(model_dir: str, kept: list[int], out_dir: str) -> None:
    """Writes the student of `model_dir`'s `kept` layers to `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export import generation_config_of
    from .tokenizer_compat import load_tokenizer

    config = AutoConfig.from_pretrained(model_dir)
    student_config = pruned_config(config, kept)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    prefix = layer_list_name(teacher, config.num_hidden_layers)
    student = AutoModelForCausalLM.from_config(student_config, dtype=teacher.dtype)
    student.load_state_dict(pruned_state_dict(teacher.state_dict(), prefix, kept), strict=True)
    student.generation_config = generation_config_of(model_dir, config)
    student.save_pretrained(out_dir)
    load_tokenizer(model_dir, trust_remote_code=False).save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> int:
    from .usage import asks_for_help, parser_sections, print_help, render

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fsdp_kd.prune", add_help=False)
    parser.add_argument("--model", required=True, metavar="DIR", help="the HF model directory to prune (the teacher)")
    parser.add_argument("--layers", metavar="LIST", help="the layers to keep, comma-separated, e.g. 0,5,11,17,23,29")
    parser.add_argument("--keep", type=int, metavar="N", help="keep N layers evenly spaced, first and last included")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory for the student")
    if asks_for_help(argv):
        return print_help(render(
            "python -m fsdp_kd.prune --model DIR (--keep N | --layers 0,1,...) --out DIR",
            "Makes a student from a model by depth pruning: a subset of its decoder layers, with its embeddings, "
            "final norm, head, generation config and tokenizer, saved as an HF directory.", parser_sections(parser)))
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise ConfigError(f"--model {args.model}: not an HF model directory (no config.json)")
        if os.path.exists(args.out) and os.listdir(args.out):
            raise ConfigError(f"--out {args.out}: exists and is not empty; choose a new directory")
        from transformers import AutoConfig

        n_layers = getattr(AutoConfig.from_pretrained(args.model), "num_hidden_layers", None)
        if not n_layers:
            raise ConfigError(f"--model {args.model}: its config has no num_hidden_layers (a multimodal model?); "
                              "prune its language model's directory")
        kept = choose_layers(n_layers, args.layers, args.keep)
        prune(args.model, kept, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"kept layers {','.join(map(str, kept))} of {n_layers}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
