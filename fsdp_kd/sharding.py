"""Sharding the teacher and the student with FSDP2, each by one entry of `STRATEGIES`.

Each model is wrapped in a `ShardedCausalLM` root. Per-layer FSDP units hold the decoder layers; the root holds the
embeddings, final norm and output head. The root's `forward` runs a caller's function while those root parameters are
gathered. That is how the loss kernel gets the student's *unsharded* head weight without a second copy: it runs inside
the root's forward, and FSDP's own hooks gather the head before and reduce-scatter its gradient after.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from .errors import ConfigError
from .distributed import DistEnv
from .dtypes import resolve_dtype
from .heads import output_head


class ShardedCausalLM(nn.Module):
    """FSDP2 root around an HF causal LM; `forward(fn, *args)` returns `fn(lm, *args)` with root params gathered.

    The output head lives in the root's FSDP unit, or (`separate_head`, for a frozen teacher with an untied head) in
    a unit of its own, so that the teacher's forward does not gather the head and the loss does not gather the
    embeddings. `keep_gathered` is set for a resident teacher, whose parameters are never resharded; `offloaded` for
    one whose parameters live in host memory between uses; `replicated` for one sharded within groups of ranks and
    replicated across them (HSDP), whose gradients need an all-reduce across the replicas.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.separate_head = False
        self.keep_gathered = False
        self.offloaded = False
        self.replicated = False
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


@dataclass(frozen=True)
class Strategy:
    """One FSDP2 sharding strategy: whether the parameters shard over groups of ranks and are replicated across the
    groups (HSDP), and whether each decoder layer frees its gathered parameters after its forward (else they stay
    gathered into the backward)."""
    replicated: bool
    reshard_after_forward: bool

    def mesh(self, env: DistEnv, shard_size: int | None) -> DeviceMesh:
        """1-D over every rank, or 2-D (replicate, shard) with `shard_size` ranks per group (default: a node)."""
        return env.hybrid_mesh(shard_size) if self.replicated else env.mesh


STRATEGIES = {
    "full_shard": Strategy(replicated=False, reshard_after_forward=True),  # ZeRO-3: gathered per layer, freed after
    "shard_grad_op": Strategy(replicated=False, reshard_after_forward=False),  # ZeRO-2: gathered forward to backward
    "hybrid_shard": Strategy(replicated=True, reshard_after_forward=True),  # HSDP: full shard in a group, replicas
}
TEACHER_STRATEGIES = ("full_shard", "hybrid_shard")  # a frozen teacher keeps no gradients for ZeRO-2 to shard


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks: the FSDP unit of sharding. HF names them `layers` in Llama-like models."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(lm.base_model, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the decoder layers of {type(lm).__name__}; "
                      "expected base_model.layers (Llama, Qwen2, Mistral, Phi-3, SmolLM and most others)")


def has_tied_head(lm: nn.Module) -> bool:
    return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def _shard_layers_and_root(root: ShardedCausalLM, root_reshard_after_forward: bool, head_unit: bool = False,
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


@dataclass(frozen=True)
class StudentSharding:
    """How the student shards: its strategy (a key of `STRATEGIES`), the HSDP group size, the compute dtype
    (`param_dtype`) and activation checkpointing."""
    strategy: str
    hsdp_shard_size: int | None
    param_dtype: str
    gradient_checkpointing: bool

    @classmethod
    def of(cls, cfg) -> StudentSharding:
        return cls(cfg.sharding_strategy, cfg.hsdp_shard_size, cfg.param_dtype, cfg.gradient_checkpointing)

    def shard(self, lm: nn.Module, env: DistEnv) -> ShardedCausalLM:
        """fp32 master weights, compute in `param_dtype`, gradients reduced in fp32. FSDP's reduction sums rather
        than averages: the loss is already divided by the global token count, so averaging over ranks would divide
        twice."""
        strategy = STRATEGIES[self.strategy]
        compute_dtype = resolve_dtype(self.param_dtype, env.device)
        if self.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        root = ShardedCausalLM(lm)
        root.replicated = strategy.replicated
        # The root (embeddings, norm, head) stays gathered from its forward, which ends with the loss, into the
        # backward, which starts with the loss: resharding it in between would only gather it again.
        _shard_layers_and_root(root, root_reshard_after_forward=False, mesh=strategy.mesh(env, self.hsdp_shard_size),
                               reshard_after_forward=strategy.reshard_after_forward,
                               mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32))
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        return root


@dataclass(frozen=True)
class TeacherSharding:
    """How the frozen teacher shards: its strategy (a key of `STRATEGIES`), the HSDP group size, and whether it is
    offloaded (parameters on CPU between uses) or resident (kept gathered after its first forward, trading its full
    size in memory for no all-gathers)."""
    strategy: str
    hsdp_shard_size: int | None
    offload: bool
    resident: bool

    @classmethod
    def of(cls, cfg) -> TeacherSharding:
        return cls(cfg.teacher_sharding_strategy, cfg.hsdp_shard_size, cfg.teacher_offload, cfg.teacher_resident)

    def shard(self, lm: nn.Module, env: DistEnv) -> ShardedCausalLM:
        """Frozen, eval mode, sharded per layer, head and root.

        Each micro-batch gathers every teacher parameter once: the root (embeddings, norm) for the forward, the head
        only for the loss. A tied head is the embedding, so the root stays gathered from the forward until the loss
        has read the head (`gathered_head` reshards it)."""
        strategy = STRATEGIES[self.strategy]
        lm.requires_grad_(False)
        lm.eval()
        kwargs = {"mesh": strategy.mesh(env, self.hsdp_shard_size),
                  "reshard_after_forward": strategy.reshard_after_forward and not self.resident}
        if self.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
        root = ShardedCausalLM(lm)
        tied = has_tied_head(lm)
        _shard_layers_and_root(root, root_reshard_after_forward=not (tied or self.resident),
                               head_unit=not tied, **kwargs)
        root.keep_gathered, root.offloaded = self.resident, self.offload
        return root


def parameter_count(module: nn.Module) -> int:
    """Global count: sharded parameters report their full shape."""
    return sum(p.numel() for p in module.parameters())
