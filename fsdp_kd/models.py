"""Loading the teacher and the student, checking that they speak the same tokens, and sharding both with FSDP2.

Each model is wrapped in a `ShardedCausalLM` root. Per-layer FSDP units hold the decoder layers; the root holds the
embeddings, final norm and output head. The root's `forward` runs a caller's function while those root parameters are
gathered. That is how the loss kernel gets the student's *unsharded* head weight without a second copy: it runs inside
the root's forward, and FSDP's own hooks gather the head before and reduce-scatter its gradient after.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import TrainConfig
from .data import MicroBatch, uses_sliding_window
from .distributed import DistEnv
from .dtypes import resolve_dtype
from .errors import ConfigError
from .heads import head_config, output_head
from .kernel import Head


class ShardedCausalLM(nn.Module):
    """FSDP2 root around an HF causal LM; `forward(fn, *args)` returns `fn(lm, *args)` with root params gathered.

    The output head lives in the root's FSDP unit, or (`separate_head`, for a frozen teacher with an untied head) in
    a unit of its own, so that the teacher's forward does not gather the head and the loss does not gather the
    embeddings. `keep_gathered` is set for a resident teacher, whose parameters are never resharded.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.separate_head = False
        self.keep_gathered = False
        self.resharding_units: set[nn.Module] = set()  # the FSDP units that reshard after their forward

    @property
    def head_unit(self) -> nn.Module:
        return self.lm.get_output_embeddings() if self.separate_head else self

    def forward(self, fn, *args, **kwargs):
        return fn(self.lm, *args, **kwargs)

    def reshard_everything(self) -> None:
        """Frees every gathered unit, after a forward that no backward follows (evaluation, a probe): under
        shard_grad_op or for the root, FSDP would otherwise keep them gathered until a backward."""
        if self.keep_gathered:
            return
        for module in self.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextmanager
    def gathered_head(self):
        """The output head (a loss `Head`), gathered from shards (and from CPU when offloaded) only for this block.
        A unit that is still gathered after the forward (a tied teacher root) is not gathered twice."""
        self.head_unit.unshard()
        try:
            yield output_head(self.lm)
        finally:
            if not self.keep_gathered:
                self.head_unit.reshard()


def hidden_at_targets(lm, batch: MicroBatch) -> torch.Tensor:
    """Final (normed) hidden states at the positions that have a trainable next-token target, [N, hidden].

    The rows are picked with `index_select` on indices computed on the host, so this never syncs the device. No KV
    cache: besides its memory, HF reads packed-sample boundaries off position_ids only when there is none."""
    inputs = batch.model_inputs(lm.config._attn_implementation, lm.get_input_embeddings().weight.dtype,
                                uses_sliding_window(lm.config))
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch.target_rows)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks: the FSDP unit of sharding. HF names them `layers` in Llama-like models."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(lm.base_model, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the decoder layers of {type(lm).__name__}; "
                      "expected base_model.layers (Llama, Qwen2, Mistral, Phi-3, SmolLM and most others)")


def load_tokenizer(path: str, trust_remote_code: bool, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """`chat_template` (Jinja text, or a path to a file of it) replaces the tokenizer's own. Nothing else changes:
    the export saves this tokenizer, and a pad token it never had would change what `generate` and servers do."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = (open(chat_template).read() if os.path.isfile(chat_template) else chat_template)
    return tokenizer


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded positions: never attended to and never trained, so any valid id does; the pad
    token when the tokenizer has one, else EOS."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def tokenizer_or_error(path: str, key: str, cfg: TrainConfig, chat_template: str | None = None):
    """A path that is neither a local directory nor a reachable hub id fails here, as one line; so does a student
    tokenizer that `apply_chat_template` cannot use (see `check_chat_template`)."""
    try:
        tokenizer = load_tokenizer(path, cfg.trust_remote_code, chat_template)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"key {key}: cannot load a tokenizer from the directory {path} ({reason}); it needs the "
                              "tokenizer files of the model (tokenizer.json or tokenizer.model, "
                              "tokenizer_config.json)") from None
        raise ConfigError(f"key {key}: cannot load a tokenizer from {path!r} (not a local directory, and as a hub id: "
                          f"{reason})") from None
    if key == "pretrain":
        check_chat_template(tokenizer, path, cfg)
    return tokenizer


def check_chat_template(tokenizer: PreTrainedTokenizerBase, path: str, cfg: TrainConfig) -> None:
    """The student's tokenizer (key `pretrain`) renders the data. With `apply_chat_template` it needs a chat template,
    its own or `tokenizer_chat_template`; without one, transformers fails on the first record with a traceback,
    after the process group is up. The teacher's tokenizer renders nothing, so a base-model teacher with no template
    is fine."""
    if cfg.apply_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"key apply_chat_template: the tokenizer of pretrain ({path}) has no chat template; set "
                          "tokenizer_chat_template (a Jinja template or a file), or drop --apply_chat_template")


def _id_to_token(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    table: list[str | None] = [None] * len(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx < len(table):
            table[idx] = token
    return table


def shared_vocab_size(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> int:
    """The id range both distributions are compared over: the student tokenizer's.

    Padded embedding rows (Qwen's 151936 vs 152064) are fine because only tokenizer ids count. A teacher whose
    tokenizer maps any of those ids to a different token is a different tokenizer, and is refused.
    """
    student, teacher = _id_to_token(student_tok), _id_to_token(teacher_tok)
    if len(teacher) < len(student):
        raise ConfigError(f"teacher tokenizer has {len(teacher)} tokens, fewer than the student's {len(student)}: "
                          "the teacher and student must share a tokenizer, or set cross_tokenizer: true")
    for idx, (s, t) in enumerate(zip(student, teacher)):
        if s != t:
            raise ConfigError(f"teacher and student tokenizers differ at id {idx}: student {s!r} vs teacher {t!r}; "
                              "pick a teacher from the student's model family, or set cross_tokenizer: true to "
                              "distil across tokenizers (docs/cross_tokenizer.md)")
    return len(student)


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


def load_causal_lm(path: str, cfg: TrainConfig, dtype: torch.dtype) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    return model


@contextmanager
def _parameters_on_meta():
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


def load_sharded(path: str, cfg: TrainConfig, env: DistEnv, dtype: torch.dtype, shard, role: str,
                 vocab_size: int | None = None) -> ShardedCausalLM:
    """The model at `path`, sharded by `shard(lm, cfg, env)`, without a full copy on any rank where possible.

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
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    with _parameters_on_meta():
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                              trust_remote_code=cfg.trust_remote_code)
    lm.config.use_cache = False
    if vocab_size is not None:
        check_head_covers_vocab(lm, vocab_size, role)
    files = _safetensors_index(path)
    checkpoint = _Checkpoint(files) if files is not None else None
    own_shards = checkpoint is not None and _names_match(lm, checkpoint)
    if not own_shards and env.split is not None:  # the fallback broadcasts from global rank 0, over every rank
        raise split_load_refused(role, path, files)
    if env.rank == 0:
        how = ("each rank reads its own shards from the safetensors files" if own_shards else
               f"rank 0 reads it and broadcasts to the other {env.world_size - 1} ranks (up to dist_timeout_minutes "
               f"{cfg.dist_timeout_minutes:g}), because "
               + ("its weights are not safetensors" if files is None else
                  "its tensor names differ from the model's (transformers converts them at load time)"))
        print(f"loading the {role} from {path}: {how}", flush=True)
    root = shard(lm, cfg, env)
    if own_shards:
        _read_own_shards(root, checkpoint, dtype, torch.device("cpu") if cfg.teacher_offload and role == "teacher"
                         else env.device)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full_state = load_causal_lm(path, cfg, dtype).state_dict() if env.rank == 0 else {}
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


def _safetensors_index(path: str) -> dict[str, str] | None:
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


class _Checkpoint:
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


def _names_match(lm: nn.Module, checkpoint: _Checkpoint) -> bool:
    """Every parameter (a tied one once) is in the files under its own name, with its own shape."""
    return all(name in checkpoint and list(checkpoint.slice(name).get_shape()) == list(param.shape)
               for name, param in lm.named_parameters())


def _read_own_shards(root: nn.Module, checkpoint: _Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
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
    _read_own_slices(dict(root.lm.named_parameters()), checkpoint, dtype)
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
def _read_own_slices(params: dict[str, nn.Parameter], checkpoint: _Checkpoint, dtype: torch.dtype) -> None:
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


class ShardedHead:
    """A teacher's output head alone, on ranks that do not run its body (the student ranks of a job with
    teacher_ranks): sharded over their mesh like the student, each rank reading only its rows from the teacher's
    safetensors, and gathered only while the loss reads it. Its logit transforms (soft-cap, scale) come from the
    teacher's config, as `output_head` reads them off a whole model.

    Made in two steps: the constructor checks (on the architecture built on the meta device: no memory) that the
    head covers the vocabulary and that its tensors are in the files, before anything loads; `load` shards and
    reads it."""

    def __init__(self, path: str, cfg: TrainConfig, env: DistEnv, dtype: torch.dtype, vocab_size: int):
        from transformers import AutoConfig

        path = local_model_path(path, env)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        with _parameters_on_meta():
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        check_head_covers_vocab(lm, vocab_size, "teacher")
        self.linear = lm.get_output_embeddings()
        names = {id(p): name for name, p in lm.named_parameters()}  # a tied head is named as the embedding
        self.in_files = {leaf: names[id(p)] for leaf, p in self.linear.named_parameters()}
        self.files = _safetensors_index(path)
        # what the teacher ranks' `load_sharded` would refuse, refused here before they start
        if self.files is None or not _names_match(lm, _Checkpoint(self.files)):
            raise split_load_refused("teacher", path, self.files)
        self.fields = head_config(lm.config)
        self.hidden_size, self.dtype = self.linear.weight.shape[1], dtype

    def load(self, env: DistEnv) -> None:
        self.linear.requires_grad_(False)
        fully_shard(self.linear, mesh=env.mesh)
        self.linear.to_empty(device=env.device)
        params = dict(self.linear.named_parameters())
        _read_own_slices({self.in_files[leaf]: params[leaf] for leaf in params}, _Checkpoint(self.files), self.dtype)

    @contextmanager
    def gathered(self):
        """The head (a loss `Head`), gathered from the shards for this block only."""
        self.linear.unshard()
        try:
            yield Head(self.linear.weight, getattr(self.linear, "bias", None), **self.fields)
        finally:
            self.linear.reshard()


def check_head_covers_vocab(model: nn.Module, vocab_size: int, role: str) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ConfigError(f"the {role}'s output head has {rows} rows but its tokenizer has {vocab_size} tokens")


def has_tied_head(lm: nn.Module) -> bool:
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def _shard_layers_and_root(root: "ShardedCausalLM", root_reshard_after_forward: bool, head_unit: bool = False,
                           **fsdp_kwargs) -> None:
    """One FSDP unit per decoder layer (each layer's forward starts gathering the next layer's parameters, so
    communication and, offloaded, the host-to-device copy overlap the current layer's compute), the output head as
    a unit of its own when `head_unit`, then the root."""
    layers = list(decoder_layers(root.lm))
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    if head_unit:
        fully_shard(root.lm.get_output_embeddings(), **fsdp_kwargs)
        root.separate_head = True
    fully_shard(root, **{**fsdp_kwargs, "reshard_after_forward": root_reshard_after_forward})
    resharding = bool(fsdp_kwargs.get("reshard_after_forward", True))
    root.resharding_units = set(layers + ([root.lm.get_output_embeddings()] if head_unit else [])) if resharding \
        else set()
    if root_reshard_after_forward:
        root.resharding_units.add(root)
    for layer, following in zip(layers, layers[1:]):
        layer.set_modules_to_forward_prefetch([following])


def shard_student(lm: nn.Module, cfg: TrainConfig, env: DistEnv) -> ShardedCausalLM:
    """fp32 master weights, compute in `param_dtype`, gradients reduced in fp32.

    full_shard: ZeRO-3, parameters gathered per layer and freed after use; shard_grad_op: ZeRO-2, parameters stay
    gathered from forward to backward; hybrid_shard: HSDP, full shard within a group, replicas across groups.
    FSDP's reduction sums rather than averages: the loss is already divided by the global token count, so
    averaging over ranks would divide twice."""
    compute_dtype = resolve_dtype(cfg.param_dtype, env.device)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = env.hybrid_mesh(cfg.hsdp_shard_size) if cfg.sharding_strategy == "hybrid_shard" else env.mesh
    root = ShardedCausalLM(lm)
    # The root (embeddings, norm, head) stays gathered from its forward, which ends with the loss, into the
    # backward, which starts with the loss: resharding it in between would only gather it again.
    _shard_layers_and_root(root, root_reshard_after_forward=False, mesh=mesh,
                           reshard_after_forward=cfg.sharding_strategy != "shard_grad_op",
                           mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32))
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return root


def shard_teacher(lm: nn.Module, cfg: TrainConfig, env: DistEnv) -> ShardedCausalLM:
    """Frozen, eval mode, sharded per layer, head and root. Offloaded: parameters live on CPU between uses.
    Resident: kept gathered after the first forward, trading its full size in memory for no all-gathers.

    Each micro-batch gathers every teacher parameter once: the root (embeddings, norm) for the forward, the head
    only for the loss. A tied head is the embedding, so the root stays gathered from the forward until the loss
    has read the head (`gathered_head` reshards it)."""
    lm.requires_grad_(False)
    lm.eval()
    kwargs = {"mesh": env.hybrid_mesh(cfg.hsdp_shard_size) if cfg.teacher_sharding_strategy == "hybrid_shard"
              else env.mesh, "reshard_after_forward": not cfg.teacher_resident}
    if cfg.teacher_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
    root = ShardedCausalLM(lm)
    tied = has_tied_head(lm)
    _shard_layers_and_root(root, root_reshard_after_forward=not (tied or cfg.teacher_resident),
                           head_unit=not tied, **kwargs)
    root.keep_gathered = cfg.teacher_resident
    return root


def parameter_count(module: nn.Module) -> int:
    """Global count: sharded parameters report their full shape."""
    return sum(p.numel() for p in module.parameters())
