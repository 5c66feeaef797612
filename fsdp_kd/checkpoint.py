"""Sharded training checkpoints (torch.distributed.checkpoint) and the HF-format export.

A checkpoint is written to `step_N.partial/` and renamed to `step_N/` by rank 0 only after every rank has finished
and the train state is on disk; a rename is atomic, so a directory named `step_N` is always complete, and a
`.partial` left by a kill is never loaded (it is removed at the next start). Nothing is unpickled: DCP reads tensors,
the train state is JSON, and the per-rank RNG files load with `weights_only=True`.

The export writes safetensors from the shards through DCP's HuggingFace storage writer: each rank writes its own
shard files, and rank 0 stitches them into full tensors file by file, so no rank ever holds the whole model.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import ConfigError, TrainConfig, resume_mismatches

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.json"
MAX_SHARD_BYTES = 4 * 1024**3


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(ckpt_path: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_path):
        return []
    found = []
    for name in os.listdir(ckpt_path):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(ckpt_path, name, TRAIN_STATE)):
            found.append((int(m.group(1)), os.path.join(ckpt_path, name)))
    return sorted(found)


def remove_partial_checkpoints(ckpt_path: str) -> list[str]:
    """Rank 0 only, at start: leftovers of saves that were killed halfway."""
    if not os.path.isdir(ckpt_path):
        return []
    removed = []
    for name in os.listdir(ckpt_path):
        if name.endswith(".partial"):
            shutil.rmtree(os.path.join(ckpt_path, name), ignore_errors=True)
            removed.append(name)
    return removed


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class CheckpointWriter:
    """Writes `step_N` checkpoints, synchronously or in the background (`async_save`). Collective: every rank
    calls every method.

    An asynchronous save stages the state to host memory, lets training go on while a thread writes it, and is
    completed (barrier, train state, atomic rename, rotation) before the next save and before the export. Its
    collectives run on a Gloo group of their own so they never interleave with training's. A run killed while a
    save is in flight leaves only a `.partial` directory, which is never loaded.
    """

    def __init__(self, cfg: TrainConfig, rank: int, asynchronous: bool):
        self.cfg, self.rank = cfg, rank
        self.pending = None  # (future, partial dir, final dir, step)
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self.asynchronous = asynchronous

    def save(self, root, optimizer, step: int) -> str:
        self.finish()
        final = os.path.join(self.cfg.resolved_ckpt_path(), f"step_{step}")
        partial = final + ".partial"
        os.makedirs(partial, exist_ok=True)
        model_state, optim_state = get_state_dict(root, optimizer)
        state = {"model": model_state, "optim": optim_state}
        torch.save(_rng_state(), os.path.join(partial, f"rng_rank{self.rank}.pt"))
        if self.asynchronous:
            self.pending = (dcp.async_save(state, checkpoint_id=partial, process_group=self.group), partial, final,
                            step)
        else:
            dcp.save(state, checkpoint_id=partial)
            self._complete(partial, final, step)
        return final

    def finish(self) -> None:
        """Waits for an in-flight save and completes it."""
        if self.pending is not None:
            future, partial, final, step = self.pending
            future.result()
            self.pending = None
            self._complete(partial, final, step)

    def _complete(self, partial: str, final: str, step: int) -> None:
        _barrier()
        if self.rank == 0:
            with open(os.path.join(partial, TRAIN_STATE), "w") as f:
                json.dump({"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                           "config": self.cfg.to_dict()}, f, indent=1)
            os.rename(partial, final)
            for _, old in complete_checkpoints(self.cfg.resolved_ckpt_path())[:-self.cfg.max_ckpt_num]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()


def read_train_state(path: str) -> dict:
    with open(os.path.join(path, TRAIN_STATE)) as f:
        return json.load(f)


def check_resumable(path: str, cfg: TrainConfig) -> dict:
    """Refuses a checkpoint whose run differs in something that changes what training means."""
    state = read_train_state(path)
    mismatched = resume_mismatches(state["config"], cfg)
    if mismatched:
        raise ConfigError(f"{path}: cannot resume, the config differs in {', '.join(mismatched)}; "
                          "restore those keys or use a new ckpt_path")
    return state


def load_checkpoint(root, optimizer, path: str, rank: int) -> int:
    """Collective. DCP reshards, so a checkpoint from another world size loads; only the RNG files are per rank."""
    model_state, optim_state = get_state_dict(root, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return read_train_state(path)["step"]


def load_model_weights(root, path: str) -> None:
    """Collective. Only the model's tensors, for export: the optimizer state in the checkpoint is not read."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(root)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(root, state["model"])


def export_student(root, model_config, tokenizer, out_dir: str, rank: int) -> None:
    """Collective. The student as an HF directory, in the dtype its original checkpoint was published in."""
    dtype = getattr(model_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model_config.dtype = dtype
    export_hf(export_state_dict(root.lm, dtype), model_config, tokenizer, out_dir, rank)


def export_state_dict(lm: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF state dict: parameters once each (a tied head is saved under the embedding's name only) plus
    persistent buffers, cast to the export dtype shard by shard."""
    names = {n for n, _ in lm.named_parameters()}
    names |= {n for n, _ in lm.named_buffers()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in lm.state_dict().items() if k in names}


def _file_assignment(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tensors to safetensors files of at most MAX_SHARD_BYTES, in order (1-based, as HF names them)."""
    mapping, index, used = {}, 1, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if used and used + size > MAX_SHARD_BYTES:
            index, used = index + 1, 0
        mapping[name] = index
        used += size
    return mapping


def export_hf(state: dict[str, torch.Tensor], model_config, tokenizer, out_dir: str, rank: int) -> None:
    """Collective. Writes config, generation config, safetensors with index, and tokenizer into `out_dir`."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(path=out_dir, save_distributed=True, enable_consolidation=True,
                                      fqn_to_index_mapping=_file_assignment(state))
    dcp.save(state, storage_writer=writer)
    _barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(out_dir, "sharded"), ignore_errors=True)
        shutil.rmtree(os.path.join(out_dir, ".metadata"), ignore_errors=True)
        model_config.save_pretrained(out_dir)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(model_config).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    _barrier()
