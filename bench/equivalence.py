"""Bitwise equivalence of a checkout's runs: record a fixed set of short runs, compare two records.

    python bench/equivalence.py OUT.json [--checkout DIR] [--work DIR] [--runs kd,cached_topk,...]
    python bench/equivalence.py --compare A.json B.json

A record runs, through the command line only (`torchrun <checkout>/train.py`, `python -m fsdp_kd.cache_teacher`,
with PYTHONPATH and cwd the checkout), a KD run with a checkpoint, a top-k and a hidden-state cached run, an
on-policy run (the tied-head Qwen2 pair), a cross-tokenizer run and the size sweep (worlds 1, 2, 3 at micro-batch 1, 41 records), on tiny
models and data it builds itself with plain transformers/tokenizers code under <work>/assets (built once, reused by
later records, so two checkouts' runs read the same files). For each run it keeps every metrics.jsonl line without
the machine's timings, a sha256 of every tensor of the exported model, of every checkpoint (DCP shards read back
with torch's format utils, the per-rank RNG files) and of every cache part, and the run's JSON files with the work
directory's path replaced. `--compare` prints, per run, `equal` or the first difference, and exits 1 on any.

Nothing of fsdp_kd is imported, so the same script records a checkout before and after a refactor of its internals.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Wall-clock measurements of the machine, not of the run: tests/test_checkpoint.py's TIMING_KEYS in metrics.jsonl, and
# a cache build's time in cache.json
TIMING_KEYS = {"tokens_per_sec", "peak_mem_gb", "gen_tokens_per_sec", "seconds"}
CHARS = list("0123456789+=-*() \nABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,:?")
STUDENT_PAIRS = ("AB", "CD", "EF", "GH", "ab", "cd")
TEACHER_PAIRS = ("BC", "DE", "AB", "IJ", "ba")  # AB is both sides' token


# ---------------------------------------------------------------------------------------------------- the assets

def char_tokenizer(out_dir: Path, pairs: tuple[str, ...] = ()):
    """A character-level fast tokenizer (pad, eos, unk, then the characters, then `pairs`, which are taken before
    single characters): ids are stable and every string round-trips. The demo's tokenizer, written here again so
    that a record builds the same files whatever the checkout under test holds."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + CHARS + list(pairs))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("".join(f"{re.escape(p)}|" for p in pairs) + "."),
                                              behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(out_dir)
    return tok


def tiny_model(out_dir: Path, tok, hidden: int, family: str, seed: int, tie: bool, sharpen: bool) -> None:
    """A random two-layer Llama or Qwen2 with `tok` beside it; a teacher's head is scaled by 20 (`sharpen`), so it
    predicts something other than near-uniform and there is something to distil."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, config_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    config = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    model = cls(config)
    if sharpen:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def translation_records(seed: int, n: int) -> list[dict]:
    """`n` {"input", "output"} records of a toy translation: each source letter, after the letter before it, is
    rendered as one of three target letters drawn 0.5 / 0.3 / 0.2."""
    rng = random.Random(seed)
    table = {(p, c): rng.sample("ABCDEFGHIJKLMNOP", 3) for p in " abcdefgh" for c in "abcdefgh"}
    words = ["".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(n)]
    return [{"input": f"{w}:", "output": "".join(rng.choices(table[(p, c)], (0.5, 0.3, 0.2))[0]
                                                 for p, c in zip(" " + w, w))} for w in words]


def build_assets(root: Path) -> dict[str, str]:
    """The tokenizers, models and data every run reads, under `root` (built once: a complete `root` is reused)."""
    paths = {name: str(root / name) for name in ("teacher", "student", "qwen_teacher", "qwen_student",
                                                  "pair_teacher", "pair_student")}
    paths.update({name: str(root / f"{name}.jsonl") for name in ("train", "eval", "train41", "eval5", "eval3")})
    done = root / "complete"
    if done.exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    chars = char_tokenizer(root / "tok")
    for name, tok, hidden, family, seed, tie, sharpen in (
            ("teacher", chars, 64, "llama", 1, False, True), ("student", chars, 32, "llama", 2, False, False),
            ("qwen_teacher", chars, 64, "qwen2", 3, True, True), ("qwen_student", chars, 32, "qwen2", 4, True, False),
            ("pair_student", char_tokenizer(root / "tok_ps", STUDENT_PAIRS), 32, "llama", 5, False, False),
            ("pair_teacher", char_tokenizer(root / "tok_pt", TEACHER_PAIRS), 64, "llama", 6, False, True)):
        tiny_model(Path(paths[name]), tok, hidden, family, seed, tie, sharpen)
    records = translation_records(0, 280)
    for name, chosen in (("train", records[:256]), ("eval", records[256:]), ("train41", records[:41]),
                         ("eval5", records[256:261]), ("eval3", records[256:259])):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in chosen)
    done.write_text("")
    return paths


# ------------------------------------------------------------------------------------------------------ the runs

def kd_flags(a: dict, save: Path, **overrides) -> list[str]:
    """A short KD run on the tiny Llama pair (tests/conftest.py's train_args); overrides win, None drops a key."""
    values = {"pretrain": a["student"], "teacher_model": a["teacher"], "dataset": a["train"], "train_batch_size": 16,
              "micro_train_batch_size": 4, "max_steps": 4, "learning_rate": 3e-3, "kd_coef": 0.5,
              "save_path": str(save), "lr_warmup_ratio": 0.0, "logging_steps": 1, **overrides}
    return [arg for key, value in values.items() if value is not None for arg in (f"--{key}", str(value))]


def plan(a: dict, out: Path) -> dict[str, tuple[list[tuple[int, list[str]]], list[str]]]:
    """{run name: (its launches, the directories under `out` they write)}. A launch is (ranks, argv after torchrun's
    own flags): argv starting with "-m" runs that module, any other runs train.py."""
    sweep = dict(pretrain=a["student"], dataset=a["train41"], eval_dataset=a["eval5"], train_batch_size=18,
                 micro_train_batch_size=1, max_steps=2, max_len=32, param_dtype="fp32", eval_steps=2)
    cached = dict(eval_dataset=a["eval3"], micro_train_batch_size=1, train_batch_size=8, max_steps=2, eval_steps=2,
                  cache_chunk_samples=100)
    cross = dict(pretrain=a["pair_student"], teacher_model=a["pair_teacher"], cross_tokenizer="true",
                 kd_coef=1.0, max_steps=3, learning_rate=1e-2, packing_samples="true", max_len=64,
                 eval_dataset=a["eval"], eval_steps=3)

    def from_cache(name, train_overrides, **cache_flags):
        cache = out / f"{name}.cache"
        build = ["-m", "fsdp_kd.cache_teacher", *kd_flags(a, out / "unused", teacher_cache=cache, **cache_flags,
                                                          **cached)]
        train = kd_flags(a, out / name, teacher_model=None, teacher_cache=cache, **cache_flags, **cached,
                         **train_overrides)
        return [(2, build), (2, train)], [cache.name, name]

    return {
        "kd": ([(2, kd_flags(a, out / "kd", kd_loss="forward_kl", eval_dataset=a["eval"], eval_steps=2,
                             save_steps=2, max_ckpt_num=5))], ["kd"]),
        "cached_topk": from_cache("cached_topk", {}, cache_k=8),
        "cached_hidden": from_cache("cached_hidden", {"kd_loss": "reverse_kl"}, cache_mode="hidden"),
        "on_policy": ([(2, kd_flags(a, out / "on_policy", pretrain=a["qwen_student"], teacher_model=a["qwen_teacher"],
                                    on_policy_ratio=0.5, generate_max_new_tokens=8, kd_loss="reverse_kl",
                                    max_steps=3))], ["on_policy"]),
        "cross_tokenizer": ([(2, kd_flags(a, out / "cross_tokenizer", **cross))], ["cross_tokenizer"]),
        **{f"sweep_world{w}": ([(w, kd_flags(a, out / f"sweep_world{w}", **sweep))], [f"sweep_world{w}"])
           for w in (1, 2, 3)},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(checkout: Path, ranks: int, argv: list[str], env: dict, log: Path) -> None:
    target = argv if argv[0] == "-m" else [str(checkout / "train.py"), *argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), *target]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}\nfailed with exit {proc.returncode}; its output is in {log}")


# --------------------------------------------------------------------------------------------- what a run wrote

def tensor_hashes(tensors: dict) -> dict[str, str]:
    """{name: sha256 of dtype, shape and bytes}, for a flat dict of tensors."""
    import torch

    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            out[name] = repr(t)
            continue
        t = t.detach().cpu()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} ".encode() + data).hexdigest()
    return out


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def dcp_hashes(directory: Path, scratch: Path) -> dict[str, str]:
    """Every tensor of a DCP checkpoint, read back into one state dict with torch's format utils."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(directory), str(scratch))
    state = torch.load(scratch, weights_only=True)
    scratch.unlink()
    return tensor_hashes(flatten(state))


def scrub(obj, work: str):
    """`obj` with the work directory's path replaced and the timing keys dropped, at any depth."""
    if isinstance(obj, dict):
        return {k: scrub(v, work) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [scrub(v, work) for v in obj]
    return obj.replace(work, "<work>") if isinstance(obj, str) else obj


def read_json_like(path: Path, work: str):
    text = path.read_text()
    try:
        return scrub(json.loads(text), work)
    except ValueError:
        return text.replace(work, "<work>")


def files_of(directory: Path, work: str, scratch: Path) -> dict:
    """Every file under `directory` by its relative path: metrics.jsonl as its lines without timings, tensors as
    per-tensor hashes (safetensors, RNG .pt files, DCP directories), JSON/YAML/text scrubbed, others hashed whole."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_dir():
            if (path / ".metadata").exists():
                out[rel + "/<dcp>"] = dcp_hashes(path, scratch)
            continue
        if path.name == "metrics.jsonl":
            out[rel] = [scrub(json.loads(line), work) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".safetensors":
            out[rel] = tensor_hashes(load_file(path))
        elif path.suffix == ".pt":
            out[rel] = tensor_hashes(flatten(torch.load(path, weights_only=True)))
        elif path.suffix == ".distcp":
            continue  # read as a whole checkpoint above
        elif path.name == ".metadata":
            continue  # the DCP index, read as a whole checkpoint above
        elif path.suffix in (".json", ".yaml", ".txt", ".jinja"):
            out[rel] = read_json_like(path, work)
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def record(args) -> None:
    checkout, work = Path(args.checkout).resolve(), Path(args.work).resolve()
    assets = build_assets(work / "assets")
    out = work / "runs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "FSDP_KD_DATA_CACHE": str(out / "data_cache")}  # tokenized fresh: never another checkout's cache
    runs = plan(assets, out)
    chosen = args.runs.split(",") if args.runs else list(runs)
    result = {"checkout": str(checkout), "git": git_head(checkout),
              "assets": files_of(work / "assets", str(work), out / "scratch.pt"),
              "runs": {}}
    started = time.time()
    for name in chosen:
        t0 = time.time()
        log = out / f"{name}.log"
        launches, directories = runs[name]
        for ranks, argv in launches:
            launch(checkout, ranks, argv, env, log)
        written = {d: files_of(out / d, str(work), out / "scratch.pt") for d in directories}
        result["runs"][name] = written
        digest = hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()[:16]
        print(f"{name:<16} {time.time() - t0:6.1f}s  {sum(len(v) for v in written.values()):3d} files  "
              f"sha256 {digest}", flush=True)
    result["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"recorded {len(chosen)} runs of {checkout} in {result['seconds']:.0f}s to {args.out}")


def git_head(checkout: Path) -> str:
    proc = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"], capture_output=True,
                          text=True)
    return proc.stdout.strip()


# ------------------------------------------------------------------------------------------------------- compare

def first_difference(a, b, where: str = "") -> str | None:
    """Where `a` and `b` first differ, and how; None if they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}{key}: only in {'B' if key not in a else 'A'}"
            found = first_difference(a[key], b[key], f"{where}{key} / ")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}] / ")
            if found:
                return found
        return None if len(a) == len(b) else f"{where}{len(a)} entries in A, {len(b)} in B"
    return None if a == b else f"{where[:-3]}: A {a!r}, B {b!r}"


def compare(path_a: str, path_b: str) -> int:
    a, b = json.loads(Path(path_a).read_text()), json.loads(Path(path_b).read_text())
    failed = 0
    assets = first_difference(a["assets"], b["assets"])
    if assets:
        print(f"the runs read different assets: {assets}")
        failed += 1
    for name in list(a["runs"]) + [name for name in b["runs"] if name not in a["runs"]]:
        if name not in a["runs"] or name not in b["runs"]:
            print(f"{name:<16} only in {'A' if name in a['runs'] else 'B'}")
            failed += 1
            continue
        found = first_difference(a["runs"][name], b["runs"][name])
        print(f"{name:<16} {'equal' if found is None else 'differs: ' + found}")
        failed += found is not None
    print(f"A: {a['checkout']} ({a['git']}), B: {b['checkout']} ({b['git']}): "
          + ("equal" if not failed else f"{failed} differ"))
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="record: the JSON file to write")
    parser.add_argument("--checkout", default=str(REPO), help="the repository to run (default: this one)")
    parser.add_argument("--work", default="/tmp/fsdp_kd_equivalence",
                        help="the assets (built once, then reused) and the runs' outputs (replaced by each record)")
    parser.add_argument("--runs", help="comma-separated run names (default: all)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two records instead of recording")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if not args.out:
        parser.error("name the JSON file to record to, or --compare A B")
    record(args)


if __name__ == "__main__":
    main()
