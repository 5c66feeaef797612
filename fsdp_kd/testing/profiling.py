"""Counting what a piece of code would launch on a GPU, and every host sync it would make, on any build.

On a GPU every aten operator that computes is at least one kernel launch (5-10 µs of CPU time each), and every
`aten::_local_scalar_dense` (`.item()`, `if tensor:`) or `aten::nonzero` (boolean indexing) copies a value to the
host and drains the stream. Those costs are invisible in CPU wall time, so the benchmarks and tests count them
instead: the counts are the same on the CPU build, because the same Python code issues the same operators.

An operator "launches" when it computes (it is not one of the metadata-only operators: views, reshapes,
allocations, a no-op `.to`) and nothing below it in the profiler's call tree computes: `aten::mm` launches, the
`aten::matmul` that called it does not.

The profiler sees only the syncs that are operators. `SyncDetector` sees every kind, also those that dispatch
nothing on the CPU build (`.tolist()`, a blocking copy of host data to the device), and says where each happened.
"""

from __future__ import annotations

import contextlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

# Operators that only make a view, change metadata or allocate: no kernel runs.
METADATA_ONLY = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::slice",
    "aten::select", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::alias", "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg", "aten::unbind",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::flatten", "aten::unflatten",
    "aten::result_type", "aten::is_nonzero", "aten::set_", "aten::resize_", "aten::_has_compatible_shallow_copy_type",
    "aten::contiguous", "aten::numpy_T", "aten::view_as", "aten::expand_as", "aten::squeeze_", "aten::unsqueeze_",
    "aten::as_strided_", "aten::to", "aten::type_as",
})
HOST_SYNCS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static"})
# 2-D matrix products: the loss's head products (logits and gradients). Its per-row dot products run as `bmm` and
# count as launches only.
MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_"})


@dataclass
class LaunchProfile:
    launches: int  # leaf operators that run a kernel
    host_syncs: int  # device-to-host copies of a value: each one drains the stream on a GPU
    matmuls: int
    by_name: dict[str, int]

    def per_1k(self, tokens: int) -> tuple[float, float, float]:
        scale = 1000 / max(tokens, 1)
        return self.launches * scale, self.host_syncs * scale, self.matmuls * scale


def profile_launches(fn, *args, **kwargs) -> tuple[object, LaunchProfile]:
    """Runs `fn(*args, **kwargs)` under the profiler; returns its result and what it launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn(*args, **kwargs)
    by_name: dict[str, int] = {}
    syncs = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        syncs += event.name in HOST_SYNCS
        if _computes(event) and not any(_computes_below(child) for child in event.cpu_children):
            by_name[event.name] = by_name.get(event.name, 0) + 1
    matmuls = sum(n for name, n in by_name.items() if name in MATMULS)
    return result, LaunchProfile(sum(by_name.values()), syncs, matmuls, by_name)


def _computes(event) -> bool:
    return event.name.startswith("aten::") and event.name not in METADATA_ONLY


def _computes_below(event) -> bool:
    return _computes(event) or any(_computes_below(child) for child in event.cpu_children)


# ---------------------------------------------------------------------------------------------- sync detector
SYNC_KINDS = ("host_to_device", "device_to_host", "dynamic_shape")
# Operators whose output size depends on tensor values: on a GPU the host waits for them to learn the size.
DYNAMIC_SHAPE_OPS = frozenset({
    "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "bincount", "nonzero_numpy",
})
# Reads of a device value on the host (`.item()`, `bool(t)`, `if t.any():`, `f"{t:.2f}"`; `equal` returns a bool).
READ_OPS = frozenset({"_local_scalar_dense", "equal"})
# Python-level calls that build a tensor from host data (Python numbers and lists, NumPy arrays, buffers).
DATA_CONSTRUCTORS = frozenset({torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy, torch.frombuffer,
                               torch.Tensor.new_tensor})
# Tensor methods that hand a device tensor's values to the host; on the CPU build they dispatch nothing.
HOST_READS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu})
MOVES = frozenset({torch.Tensor.to, torch.Tensor.cuda})
HOST, DEVICE = "host", "device"  # where a tensor would live on a GPU run


@dataclass(frozen=True)
class Sync:
    kind: str  # one of SYNC_KINDS
    op: str
    where: str  # the innermost Python frame outside torch, and the innermost one of this package


class SyncDetector:
    """Counts what would make the host wait for a GPU, on any build: a context manager, measuring inside `counting`.

        with SyncDetector() as syncs:
            trainer.train_step(0)          # warm-up: placements are learned, nothing is counted
            with syncs.counting():
                trainer.train_step(1)
        assert not syncs.events, syncs.report()

    Three kinds, each one a stall of the CUDA stream (what `torch.cuda.set_sync_debug_mode("error")` refuses on a
    GPU), recorded with the operator and where the Python code called it:
      host_to_device  host data copied to the device without `non_blocking=True`: `torch.tensor(x, device=d)`,
                      `.to(d)` of a tensor built on the host, a host tensor (not a 0-dim scalar) in a device op;
      device_to_host  a device value read on the host: `.item()`, `bool(t)`, `if t.any():`, `.tolist()`,
                      `.numpy()`, `.cpu()`;
      dynamic_shape   an operator whose output size depends on values: `nonzero`, boolean-mask indexing,
                      `masked_select`, `unique`, `repeat_interleave` without `output_size`, `bincount`.

    On the CPU build host and device are the same memory, so the detector infers where each tensor would live on a
    GPU from how it was made. On the host: tensors built from host data, factories called without a `device`
    argument or with the string "cpu" (`torch.zeros(3)`, `torch.randperm(n)`), `.cpu()`, and what is computed from
    host tensors alone. On the device: factories given a `device`, what `.to(device)` returns, and what is computed
    from any device tensor. So the code under test must say `device=` wherever it means the device, and must move
    its host data with `.to(device, non_blocking=True)` (from pinned memory on CUDA, `data.to_device`), the one
    transfer that does not stall. Tensors made before the detector started have no known place (parameters are
    all-gathered into device buffers, batches moved): start it before a warm-up step, so that the step's own
    tensors, host ones included, are placed when counting starts. Not seen: host memory that the CPU build cannot
    tell from device memory (a buffer left on the host while its module runs on the GPU).
    """

    def __init__(self):
        self.events: list[Sync] = []
        self._placed = WeakIdKeyDictionary()  # tensor -> HOST or DEVICE, where it would live on a GPU run
        self._counting = False
        self._modes = (_PlacementFunctions(self), _PlacementDispatch(self))

    def __enter__(self) -> "SyncDetector":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @contextmanager
    def counting(self):
        self._counting = True
        try:
            yield self
        finally:
            self._counting = False

    def counts(self) -> dict[str, int]:
        return {kind: sum(e.kind == kind for e in self.events) for kind in SYNC_KINDS}

    def report(self) -> str:
        """Each distinct (kind, op, place) with how often it happened, most frequent first."""
        seen: dict[Sync, int] = {}
        for event in self.events:
            seen[event] = seen.get(event, 0) + 1
        lines = [f"{n}× {e.kind} {e.op} at {e.where}" for e, n in sorted(seen.items(), key=lambda kv: -kv[1])]
        return f"{len(self.events)} syncs {self.counts()}" + "".join("\n  " + line for line in lines)

    # -------------------------------------------------------------------------------------- placement
    def on_host(self, t: torch.Tensor) -> bool:
        return self._placed.get(t) is HOST

    def on_device(self, t: torch.Tensor) -> bool:
        return self._placed.get(t) is DEVICE

    def place(self, t: torch.Tensor, where: str) -> None:
        self._placed[t] = where

    def moved(self, source: torch.Tensor, out: torch.Tensor, to_device: bool, non_blocking: bool, op: str) -> None:
        """A copy of `source` to the device or to the host: from the host it stalls unless asynchronous; to the host
        it always does (the host needs the values). On the CPU build a move can return `source` itself; a read back
        to the host then leaves it where it was."""
        if to_device:
            if self.on_host(source) and not non_blocking:
                self.record("host_to_device", op)
            self.place(out, DEVICE)
        else:
            if self.on_device(source):
                self.record("device_to_host", op)
            if isinstance(out, torch.Tensor) and out is not source:
                self.place(out, HOST)

    def record(self, kind: str, op: str) -> None:
        if self._counting:
            self.events.append(Sync(kind, op, _caller()))


class _PlacementFunctions(TorchFunctionMode):
    """Python-level calls: where a factory or a move puts its tensor, and reads that dispatch nothing on the CPU."""

    def __init__(self, detector: SyncDetector):
        super().__init__()
        self.detector = detector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        detector = self.detector
        if func in HOST_READS:
            detector.moved(args[0], out, False, False, func.__name__)
        elif func in MOVES:
            target, non_blocking = _move_target(func, args, kwargs, detector)
            if target is not None:
                detector.moved(args[0], out, target, non_blocking, func.__name__)
        elif isinstance(out, torch.Tensor) and (func in DATA_CONSTRUCTORS or not _tensors((args, kwargs))):
            self._constructed(func, args, kwargs, out)
        return out

    def _constructed(self, func, args, kwargs, out) -> None:
        """A factory's tensor is on the device it names (none: the host); one built from host data and put on the
        device was copied there, blocking."""
        detector = self.detector
        to_device = _names_device(kwargs.get("device"))
        if func is torch.Tensor.new_tensor:
            data, to_device = args[1], detector.on_device(args[0]) if to_device is None else to_device
        else:
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
        if isinstance(data, torch.Tensor):  # torch.as_tensor(t, device=...) is a move of t
            if to_device is not None:
                detector.moved(data, out, to_device, False, func.__name__)
            return
        if to_device and func in DATA_CONSTRUCTORS and out.numel():  # copying nothing does not wait
            detector.record("host_to_device", func.__name__)
        detector.place(out, DEVICE if to_device else HOST)


def _names_device(device) -> bool | None:
    """Whether a `device` argument means the device: None when not given; False for the string "cpu", which code
    writes only when it means the host (on the CPU build the compute device is the torch.device cpu as well)."""
    if device is None:
        return None
    return not (isinstance(device, str) and device.split(":")[0] == "cpu")


def _move_target(func, args, kwargs, detector: SyncDetector) -> tuple[bool | None, bool]:
    """(to the device, to the host, or no move: True / False / None; non_blocking) of `.to(...)` or `.cuda(...)`."""
    if func is torch.Tensor.cuda:
        return True, bool(kwargs.get("non_blocking", len(args) > 2 and args[2]))
    device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
    other = args[1] if len(args) > 1 else kwargs.get("other")
    if isinstance(other, torch.Tensor):
        return detector.on_device(other), non_blocking
    if device is None:
        return None, non_blocking
    raw = args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else kwargs.get("device", device)
    return _names_device(raw), non_blocking


class _PlacementDispatch(TorchDispatchMode):
    """Every operator: the syncs it makes from the placement of its inputs, and the placement of its outputs."""

    def __init__(self, detector: SyncDetector):
        super().__init__()
        self.detector = detector

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        detector = self.detector
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if name in ("lift_fresh", "lift_fresh_copy"):  # a tensor made from Python data (a constructor places it)
            detector.place(out, HOST)
            return out
        inputs = [t for t in _tensors((args, kwargs)) if t.device.type != "meta"]
        device_in = any(detector.on_device(t) for t in inputs)
        if name == "copy_":
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
            if detector.on_device(args[0]) and detector.on_host(args[1]) and not non_blocking:
                detector.record("host_to_device", name)
            elif detector.on_host(args[0]) and detector.on_device(args[1]):
                detector.record("device_to_host", name)
        elif device_in:
            if name in READ_OPS:
                detector.record("device_to_host", name)
            elif name in DYNAMIC_SHAPE_OPS or _boolean_index(name, args) or (
                    name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and
                    kwargs.get("output_size") is None):
                detector.record("dynamic_shape", name)
            elif any(detector.on_host(t) and t.dim() for t in inputs):  # CUDA ops take 0-dim host scalars only
                detector.record("host_to_device", name)
        host_in = any(detector.on_host(t) for t in inputs)
        if device_in or host_in:
            for t in _tensors(out):
                if not any(t is i for i in inputs):  # an in-place op's tensor stays where it was
                    detector.place(t, DEVICE if device_in else HOST)
        return out


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _boolean_index(name: str, args) -> bool:
    """`t[mask]` and `t[mask] = v`: indexing with a boolean tensor runs a `nonzero` inside the kernel."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])


_SKIPPED = (os.path.dirname(torch.__file__) + os.sep, os.path.abspath(__file__), contextlib.__file__)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # fsdp_kd/, not testing/
_REPO = os.path.dirname(_PACKAGE.rstrip(os.sep)) + os.sep


def _caller() -> str:
    """'file:line function' of the innermost frame outside torch, then (if that is not this package's) the innermost
    frame of this package."""
    first, ours = None, None
    frame = sys._getframe(1)
    while frame is not None and ours is None:
        path = frame.f_code.co_filename
        if not path.startswith(_SKIPPED):
            where = f"{_short(path)}:{frame.f_lineno} {frame.f_code.co_name}"
            first = first or where
            if path.startswith(_PACKAGE):
                ours = where
        frame = frame.f_back
    return first if ours in (None, first) else f"{first} (from {ours})"


def _short(path: str) -> str:
    """A library's path from its site-packages, the project's from its root."""
    installed = "site-packages" + os.sep
    if installed in path:
        return path.split(installed, 1)[1]
    return path[len(_REPO):] if path.startswith(_REPO) else path


__all__ = ["LaunchProfile", "profile_launches", "METADATA_ONLY", "HOST_SYNCS", "Sync", "SyncDetector", "SYNC_KINDS"]
