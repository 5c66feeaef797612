"""Sharded training checkpoints (torch.distributed.checkpoint): save, rotate, find, resume.

A checkpoint is written to `step_N.partial/` and renamed to `step_N/` by rank 0 only after every rank has finished
and the train state is on disk; a rename is atomic, so a directory named `step_N` is always complete, and a
`.partial` left by a kill is never loaded (it is removed at the next start). Rotation renames an old checkpoint to
`step_N.deleting` before deleting it, so a kill halfway through a delete never leaves a half-deleted directory under
a complete name. Weights are checked to be finite before anything is written. Nothing is unpickled: DCP reads
tensors, the train state is JSON, and the per-rank RNG files load with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .config import resume_mismatches
from .distributed import all_reduce_sum, barrier, side_group, side_size
from .errors import ConfigError

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE = "train_state.json"


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
    """Rank 0 only, at start: leftovers of saves and of rotations that were killed halfway."""
    if not os.path.isdir(ckpt_path):
        return []
    removed = []
    for name in os.listdir(ckpt_path):
        if name.endswith((".partial", ".deleting")):
            shutil.rmtree(os.path.join(ckpt_path, name), ignore_errors=True)
            removed.append(name)
    return removed


class NonFiniteWeights(RuntimeError):
    """The model holds NaN or inf; it is never written. Found by a collective check, so alike on every rank."""
    same_on_every_rank = True


def check_finite(root, what: str) -> None:
    """Collective. Raises on every rank if any rank's shard of any parameter is not finite: a pass over the
    weights, cheap next to writing them."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in root.parameters()]
    ok = torch.stack([torch.isfinite(p).all() for p in local]).all() if local else torch.tensor(True)
    flag = all_reduce_sum((~ok).to(torch.int32).reshape(1))  # ranks with a non-finite shard
    if bool(flag.item()):
        bad = next((name for name, p in root.named_parameters()
                    if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()), "on another rank")
        raise NonFiniteWeights(f"the student's weights are not finite (first: {bad}); {what} was not written")


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

    def __init__(self, directory: str, keep: int, run_config: dict, rank: int, asynchronous: bool, data: list[dict],
                 timeout_minutes: float):
        """Checkpoints go to `directory` (ckpt_path), the newest `keep` (max_ckpt_num) kept. Every train state records
        `run_config` (the config as a dict) and `data` (`data_fingerprint` of the training sources). A background
        save's group times out after `timeout_minutes` (dist_timeout_minutes)."""
        self.directory, self.keep, self.run_config = directory, keep, run_config
        self.rank, self.data = rank, data
        self.pending = None  # (future, partial dir, final dir, step)
        self.group = None
        if asynchronous and dist.is_initialized():  # this side's ranks only: in a split job the others never save
            side = side_group()
            self.group = dist.new_group(None if side is None else dist.get_process_group_ranks(side),
                                        backend="gloo", use_local_synchronization=True,
                                        timeout=timedelta(minutes=timeout_minutes))
        self.asynchronous = asynchronous

    def save(self, root, optimizer, step: int, synchronous: bool = False) -> str:
        """Writes `step_N` (in the background with `async_save`, unless `synchronous`), after any save in flight."""
        self.finish()
        final = os.path.join(self.directory, f"step_{step}")
        check_finite(root, f"checkpoint {final}")
        partial = final + ".partial"
        model_state, optim_state = get_state_dict(root, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with self._explained(final):
            os.makedirs(partial, exist_ok=True)
            torch.save(_rng_state(), os.path.join(partial, f"rng_rank{self.rank}.pt"))
            if self.asynchronous and not synchronous:
                self.pending = (dcp.async_save(state, checkpoint_id=partial, process_group=self.group), partial,
                                final, step)
                return final
            dcp.save(state, checkpoint_id=partial, process_group=side_group())
        self._complete(partial, final, step)
        return final

    @contextmanager
    def _explained(self, final: str):
        """A failed write becomes one CheckpointError that says where, how much room the disk had left (torch's
        own message for a full disk can be as cryptic as "unexpected pos 704 vs 598"), and which checkpoint is
        still the last complete one. The `.partial` directory it leaves is removed at the next start."""
        try:
            yield
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            directory = self.directory
            try:
                free = f"{shutil.disk_usage(directory).free / 1024**2:.1f} MiB free there"
            except OSError:
                free = "free space unknown"
            raise CheckpointError(f"writing checkpoint {final} failed ({free}): {_root_cause(e)}; the last "
                                  f"complete checkpoint is {latest_checkpoint(directory)}") from e

    def finish(self) -> None:
        """Waits for an in-flight save and completes it. A failed save raises here, and leaves only its
        `.partial` directory: the checkpoints before it stay complete."""
        if self.pending is not None:
            future, partial, final, step = self.pending
            self.pending = None
            with self._explained(final):
                future.result()
            self._complete(partial, final, step)

    def poll(self) -> None:
        """Raises now, not at the next save, if a background save has already failed."""
        if self.pending is not None and self.pending[0].done() and self.pending[0].exception() is not None:
            self.finish()

    def _complete(self, partial: str, final: str, step: int) -> None:
        barrier()
        if self.rank == 0:
            with open(os.path.join(partial, TRAIN_STATE), "w") as f:
                json.dump({"step": step, "world_size": side_size(),
                           "config": self.run_config, "data": self.data}, f, indent=1)
            os.rename(partial, final)
            for _, old in complete_checkpoints(self.directory)[:-self.keep]:
                os.rename(old, old + ".deleting")  # no longer complete before the first file goes
                shutil.rmtree(old + ".deleting", ignore_errors=True)
        barrier()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written."""


def _root_cause(error: BaseException) -> str:
    """'Type: message' of the first rank's failure inside a DCP CheckpointException (whose own text is every
    rank's traceback), or of the error itself."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (cause, _) = next(iter(sorted(error.failures.items())))
        return f"{type(cause).__name__}: {cause} (rank {rank})"
    return f"{type(error).__name__}: {error}"


def latest_checkpoint(ckpt_path: str) -> str:
    """The newest complete checkpoint's path, or a phrase saying there is none; for error messages."""
    found = complete_checkpoints(ckpt_path)
    return found[-1][1] if found else "none (no checkpoint was completed)"


def read_train_state(path: str) -> dict:
    file = os.path.join(path, TRAIN_STATE)
    try:
        with open(file) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "config" not in state:
            raise ValueError("missing step or config")
        return state
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not a train state written by fsdp-kd ({e}); delete {path} to resume from "
                          "the checkpoint before it") from None


def check_resumable(path: str, run_config: dict) -> dict:
    """Refuses a checkpoint whose run differs from this one (`run_config`, the config as a dict) in something that
    changes what training means."""
    state = read_train_state(path)
    mismatched = resume_mismatches(state["config"], run_config)
    if mismatched:
        raise ConfigError(f"{path}: cannot resume, the config differs in {', '.join(mismatched)}; "
                          "restore those keys or use a new ckpt_path")
    return state


def data_fingerprint(sources) -> list[dict]:
    """What a train state records of the training data: each source's path and the sha256 of its tokenized
    samples, in row order (`TokenizedDataset.samples_sha256`, computed once when the source is tokenized and read
    from its cache's metadata, so recording it costs nothing). The config keys cannot see an edited file at the same
    path, and any change to the samples changes the sample order and the length of an epoch."""
    return [{"path": source.path, "samples_sha256": source.samples_sha256} for source in sources]


def check_same_data(path: str, data: list[dict], log=print) -> None:
    """Refuses a checkpoint whose training data has changed since it was saved (`data_fingerprint`); one saved
    before train states recorded the data resumes, with a line saying the data could not be checked."""
    saved = read_train_state(path).get("data")
    if saved is None:
        log(f"warning: {path} records no hash of its training data (saved by an older fsdp-kd), so a change to the "
            "data since then cannot be detected; resuming")
        return
    for then, now in zip(saved, data):
        if then["samples_sha256"] != now["samples_sha256"]:
            raise ConfigError(f"{path}: cannot resume, the training data {now['path']} changed since the checkpoint "
                              "(its tokenized samples differ); restore the data it was trained on, or start a new "
                              "run with a new save_path (and ckpt_path, if set)")


def load_checkpoint(root, optimizer, path: str, rank: int) -> int:
    """Collective. DCP reshards, so a checkpoint from another world size loads; only the RNG files are per rank.
    A damaged checkpoint (truncated shards, foreign files) is one error naming it."""
    model_state, optim_state = get_state_dict(root, optimizer)
    state = {"model": model_state, "optim": optim_state}
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    try:
        dcp.load(state, checkpoint_id=path, process_group=side_group())
        rng = torch.load(rng_file, weights_only=True) if os.path.isfile(rng_file) else None
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise DamagedCheckpoint(f"{path}: cannot be read ({_root_cause(e)}); delete it to resume from the "
                                "checkpoint before it") from None
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return read_train_state(path)["step"]


class DamagedCheckpoint(RuntimeError):
    """A complete-looking checkpoint whose files do not load."""


def load_model_weights(root, path: str) -> None:
    """Collective. Only the model's tensors, for export: the optimizer state in the checkpoint is not read."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(root)}
    dcp.load(state, checkpoint_id=path, process_group=side_group())
    set_model_state_dict(root, state["model"])
