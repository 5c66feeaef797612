"""Reading a model into FSDP2 shards: the local directory checked before anything loads, a hub id downloaded once per
node, and each rank's own slices read from the safetensors files (or, where that cannot be, rank 0's broadcast)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .errors import ConfigError
from .distributed import DistEnv
from .sharding import ShardedCausalLM


@dataclass(frozen=True)
class LoadSpec:
    """How the run's models load: whether a model's own .py files may run, the attention implementation, and how
    long the other ranks wait for rank 0 to broadcast a model it reads whole (the load says so)."""
    trust_remote_code: bool
    attn_implementation: str
    dist_timeout_minutes: float

    @classmethod
    def of(cls, cfg) -> LoadSpec:
        return cls(cfg.trust_remote_code, cfg.attn_implementation, cfg.dist_timeout_minutes)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str, key: str, trust_remote_code: bool) -> None:
    """A local model directory is complete before anything loads: a config transformers knows, weight files, and
    safetensors files whose headers read (a truncated download fails here, naming the file, not minutes later)."""
    import json

    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"key {key}: {path}/config.json cannot be read as a model config ({reason})") from None
    names = set(os.listdir(path))
    if not names & set(WEIGHT_FILES):
        raise ConfigError(f"key {key}: {path} has no model weights (none of {', '.join(WEIGHT_FILES)}); point it at "
                          "a complete HF model directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
    else:
        files = sorted(n for n in names if n.endswith(".safetensors"))
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ConfigError(f"key {key}: {file} is listed in model.safetensors.index.json but missing; "
                              "re-download the model")
        try:
            with safe_open(file, framework="pt"):
                pass  # opening reads the header and checks that the file covers every tensor it lists
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise ConfigError(f"key {key}: {file} is truncated or not a safetensors file ({e}); re-download "
                              "it") from None


def load_causal_lm(path: str, spec: LoadSpec, dtype: torch.dtype) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code)
    model.config.use_cache = False
    return model


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real, because
    non-persistent ones (rotary frequencies) are computed at construction and are not in any checkpoint."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_sharded(path: str, spec: LoadSpec, env: DistEnv, dtype: torch.dtype, sharding, role: str,
                 vocab_size: int | None = None) -> ShardedCausalLM:
    """The model at `path`, sharded by `sharding.shard(lm, env)`, without a full copy on any rank where possible.

    Every rank builds the architecture with its parameters on the meta device and shards it. Then, when `path` is a
    local directory of safetensors whose tensor names and shapes are the model's own, each rank reads only its own
    slice of each tensor from the files and converts it to `dtype` (`_read_own_shards`): host memory per rank is its
    shard, not the model. Otherwise (pytorch_model.bin, or checkpoints whose names transformers converts at load
    time, such as the per-expert tensors of MoE models) global rank 0 loads the model with `from_pretrained` and
    broadcasts each tensor to the ranks, which keep their slices: the full model once in host memory.
    """
    import time

    from transformers import AutoConfig

    started = time.time()
    path = local_model_path(path, env)
    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    with parameters_on_meta():
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation,
                                              trust_remote_code=spec.trust_remote_code)
    lm.config.use_cache = False
    if vocab_size is not None:
        check_head_covers_vocab(lm, vocab_size, role)
    files = safetensors_index(path)
    checkpoint = Checkpoint(files) if files is not None else None
    own_shards = checkpoint is not None and names_match(lm, checkpoint)
    if not own_shards and env.split is not None:  # the fallback broadcasts from global rank 0, over every rank
        raise split_load_refused(role, path, files)
    if env.rank == 0:
        how = ("each rank reads its own shards from the safetensors files" if own_shards else
               f"rank 0 reads it and broadcasts to the other {env.world_size - 1} ranks (up to dist_timeout_minutes "
               f"{spec.dist_timeout_minutes:g}), because "
               + ("its weights are not safetensors" if files is None else
                  "its tensor names differ from the model's (transformers converts them at load time)"))
        print(f"loading the {role} from {path}: {how}", flush=True)
    root = sharding.shard(lm, env)
    if own_shards:
        _read_own_shards(root, checkpoint, dtype, torch.device("cpu") if root.offloaded else env.device)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full_state = load_causal_lm(path, spec, dtype).state_dict() if env.rank == 0 else {}
        set_model_state_dict(root.lm, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if env.rank == 0:
        print(f"{role} loaded and sharded over {env.world_size} rank(s) in {time.time() - started:.1f}s", flush=True)
    return root


# Files a hub model's weights never need (other frameworks' weights, GGUF, original checkpoints)
_NOT_NEEDED = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.gguf", "original/*", "*.mlmodel"]


def local_model_path(path: str, env: DistEnv) -> str:
    """A local directory for `path`: itself, or, for a hub id, the snapshot in the local HF cache. The first rank
    of each node (of its side in a split job: `DistEnv.first_on_host`) downloads it while the other ranks wait (up
    to dist_timeout_minutes: a big model takes a while), so a node fetches each file once, and every rank can then
    read its own shards from the safetensors files. .bin weights are skipped when the repository has safetensors."""
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    from huggingface_hub import HfApi, snapshot_download

    from .distributed import all_gather_object

    error = None
    if env.first_on_host:
        try:
            try:
                files = HfApi().list_repo_files(path)
            except Exception:  # noqa: BLE001 - offline, or no listing: fetch what the filter allows
                files = []
            skip = _NOT_NEEDED + (["*.bin", "*.pt", "*.pth"] if any(f.endswith(".safetensors") for f in files) else [])
            print(f"downloading {path} from the hub (one rank per node; the others wait)", flush=True)
            snapshot_download(path, ignore_patterns=skip)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            error = f"cannot download {path!r} from the hub: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        raise ConfigError(errors[0])
    return snapshot_download(path, local_files_only=True)


def safetensors_index(path: str) -> dict[str, str] | None:
    """{tensor name: file} of a local directory's safetensors (single file or indexed shards), or None."""
    import json

    if not os.path.isdir(path):
        return None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


class Checkpoint:
    """A checkpoint's safetensors files, opened lazily, each once: slices of a tensor by name."""

    def __init__(self, files: dict[str, str]):
        self.files, self.handles = files, {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def slice(self, name: str):
        from safetensors import safe_open

        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt")
        return self.handles[file].get_slice(name)


def names_match(lm: nn.Module, checkpoint: Checkpoint) -> bool:
    """Every parameter (a tied one once) is in the files under its own name, with its own shape."""
    return all(name in checkpoint and list(checkpoint.slice(name).get_shape()) == list(param.shape)
               for name, param in lm.named_parameters())


def _read_own_shards(root: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
    """Materializes the sharded (meta) parameters on `device` (the host for an offloaded teacher) and fills each
    rank's local slice from the files.

    `get_slice` reads only the requested rows, so no rank reads or holds another's. Buffers stay as they are: with
    the values the constructor computed (rotary frequencies), on the compute device, where `fully_shard` put them.
    Only parameters are offloaded: a buffer in host memory would be copied to the device at every forward (rotary
    code calls `.to`) or fail in a family whose code does not. Persistent buffers found in the files are read
    whole."""
    buffers = dict(root.named_buffers(remove_duplicate=False))
    root.to_empty(device=device)  # moves the buffers too: they are put back below
    for name, buffer in buffers.items():
        owner, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(owner), leaf, buffer)
    read_own_slices(dict(root.lm.named_parameters()), checkpoint, dtype)
    with torch.no_grad():
        for name, buffer in root.lm.named_buffers():
            if name in checkpoint:
                buffer.copy_(checkpoint.slice(name)[:].to(buffer.dtype))


def split_load_refused(role: str, path: str, files: dict[str, str] | None) -> ConfigError:
    """Why a job split by teacher_ranks cannot load a model: each side must read its own shards (`load_sharded`'s
    fallback broadcasts from global rank 0 over every rank)."""
    return ConfigError(f"key teacher_ranks: every rank reads its own shards of the {role} from safetensors files "
                       f"whose tensor names and shapes are the model's own, and {path} has "
                       + ("no safetensors" if files is None else "other names or shapes")
                       + f"; save the {role} with save_pretrained (safetensors), or train without teacher_ranks")


@torch.no_grad()
def read_own_slices(params: dict[str, nn.Parameter], checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """Fills each (materialized) parameter's local shard from the checkpoint tensor named by its key."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for name, param in params.items():
        if isinstance(param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            local = param.to_local()
            if local.numel():
                rows = tuple(slice(o, o + n) for o, n in zip(offset, shape))
                local.copy_(checkpoint.slice(name)[rows].to(dtype))
        else:
            param.copy_(checkpoint.slice(name)[:].to(dtype))


def check_head_covers_vocab(model: nn.Module, vocab_size: int, role: str) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ConfigError(f"the {role}'s output head has {rows} rows but its tokenizer has {vocab_size} tokens")
