"""Counting what a piece of code would launch on a GPU, measured on any device with the torch profiler.

On a GPU every aten operator that computes is at least one kernel launch (5-10 µs of CPU time each), and every
`aten::_local_scalar_dense` (`.item()`, `if tensor:`) or `aten::nonzero` (boolean indexing) copies a value to the
host and drains the stream. Those costs are invisible in CPU wall time, so the benchmarks and tests count them
instead: the counts are the same on the CPU build, because the same Python code issues the same operators.

An operator "launches" when it computes (it is not one of the metadata-only operators: views, reshapes,
allocations, a no-op `.to`) and nothing below it in the profiler's call tree computes: `aten::mm` launches, the
`aten::matmul` that called it does not.
"""

from __future__ import annotations

from dataclasses import dataclass

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


__all__ = ["LaunchProfile", "profile_launches", "METADATA_ONLY", "HOST_SYNCS"]
