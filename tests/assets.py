"""Real third-party test assets (tokenizers and SFT data), found wherever the repository is cloned.

`real_asset("tok_qwen2.5_instruct")` or `real_asset("gsm8k/train.jsonl")` names a path in the layout of the
project's `../shared/realdata` (see its README) and returns the first of:
  1. `$FSDP_KD_TEST_ASSETS/<name>`: a folder laid out like shared/realdata;
  2. `<checkout>/../shared/realdata/<name>`: the project's CI and development machines have it;
  3. the same files from their upstream Hugging Face hub repository, through the HF cache (cached files are used
     offline too; a download is tried only when the hub answers a connect within a second or two, probed once);
and otherwise skips the test with one line naming the asset and how to provide it. conftest's summary hook counts
those skips, so a clone without the assets reports them once at the end rather than as failures.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "FSDP_KD_TEST_ASSETS"
SHARED = REPO.parent / "shared" / "realdata"
SKIP_PREFIX = "missing test asset "
HUB_CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class HubSource:
    """Where the hub holds an asset: the files to fetch (for a folder asset, every file it should hold)."""
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: tuple[str, ...]


# shared/realdata took its copies from GitHub mirrors; these are the original upstream hub repos, at their current
# revision (so a hub copy may be newer than the CI's snapshot). Folder assets get exactly the files the snapshot
# has, nothing more: e.g. no tokenizer.json for Qwen2.5 (transformers builds it from vocab.json + merges.txt).
HUB: dict[str, HubSource] = {
    "tok_qwen2.5_instruct": HubSource("Qwen/Qwen2.5-0.5B-Instruct", "model",
                                      ("tokenizer_config.json", "vocab.json", "merges.txt")),
    "tok_phi3_mini_instruct": HubSource("microsoft/Phi-3-mini-4k-instruct", "model",
                                        ("tokenizer.json", "tokenizer_config.json")),
    "tok_smollm_360m_instruct": HubSource("HuggingFaceTB/SmolLM-360M-Instruct", "model",
                                          ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                           "vocab.json", "merges.txt")),
    # The hub keeps GSM8K as parquet; it is converted to the JSONL of openai/grade-school-math (same rows, order).
    "gsm8k/train.jsonl": HubSource("openai/gsm8k", "dataset", ("main/train-00000-of-00001.parquet",)),
    "gsm8k/test.jsonl": HubSource("openai/gsm8k", "dataset", ("main/test-00000-of-00001.parquet",)),
    "llamafactory/alpaca_en_demo.json": HubSource("llamafactory/demo_data", "dataset", ("alpaca_en_demo.json",)),
    "llamafactory/identity.json": HubSource("llamafactory/demo_data", "dataset", ("identity.json",)),
    "llamafactory/glaive_toolcall_en_demo.json": HubSource("llamafactory/demo_data", "dataset",
                                                           ("glaive_toolcall_en_demo.json",)),
    # No hub copy is known of FastChat's data/dummy_conversation.json or mt_bench question.jsonl (GitHub only), nor
    # of xtuner's test file: fastchat/* and xtuner/* come from FSDP_KD_TEST_ASSETS or ../shared/realdata only.
}


# asset name -> why its hub download failed although the hub was reachable (a renamed or gated repo, say)
HUB_FAILURES: dict[str, str] = {}


def real_asset(name: str) -> Path:
    """The asset's local path, or a skip of the calling test naming it (see the module docstring)."""
    path = _resolve(name)
    if path is None:
        why = f" (the hub is reachable but {HUB_FAILURES[name]})" if name in HUB_FAILURES else ""
        pytest.skip(f"{SKIP_PREFIX}{name}: set {ENV_VAR}=<dir laid out like shared/realdata> or allow Hugging Face "
                    f"hub access{why}")
    return path


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> Path | None:
    for root in (os.environ.get(ENV_VAR), SHARED):
        if root and (Path(root) / name).exists():
            return Path(root) / name
    return _from_hub(name) if name in HUB else None


def _from_hub(name: str) -> Path | None:
    """The asset put together from HF cache files (downloaded first when missing and the hub is reachable) under
    this session's folder, laid out as in shared/realdata; None when any of its files cannot be had."""
    source = HUB[name]
    cached = []
    for file in source.files:
        path = _hub_file(name, source, file)
        if path is None:
            return None
        cached.append(path)
    target = _session_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if name.startswith("tok_"):  # a tokenizer folder holds exactly its listed files, not all the snapshot caches
        target.mkdir(exist_ok=True)
        for file, path in zip(source.files, cached):
            shutil.copyfile(path, target / Path(file).name)
    elif cached[0].suffix == ".parquet" and target.suffix == ".jsonl":
        _parquet_to_jsonl(cached[0], target)
    else:
        shutil.copyfile(cached[0], target)
    return target


def _hub_file(name: str, source: HubSource, file: str) -> Path | None:
    """The file from the HF cache, else downloaded if the hub is reachable; None when neither works."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.repo_id, file, repo_type=source.repo_type, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (its error types vary by huggingface_hub version)
        pass
    if not _hub_reachable():
        return None
    try:
        return Path(hf_hub_download(source.repo_id, file, repo_type=source.repo_type,
                                    etag_timeout=HUB_CONNECT_TIMEOUT_S))
    except Exception as e:  # noqa: BLE001 - gated, moved, rate-limited, cut off: all mean "not available here"
        while e.__cause__ is not None:  # huggingface_hub wraps the HTTP error that says what happened
            e = e.__cause__
        first_line = (str(e).strip().splitlines() or [""])[0]
        HUB_FAILURES[name] = f"{source.repo_id}/{file} failed: {type(e).__name__}: {first_line}"
        return None


@functools.lru_cache(maxsize=None)
def _hub_reachable() -> bool:
    """One TCP connect per session to the hub endpoint (or to the HTTPS proxy, where one is set), bounded as a whole,
    name lookup included, so that a machine with no network answers in about HUB_CONNECT_TIMEOUT_S, not a timeout
    per asset."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(getproxies().get("https") or constants.ENDPOINT)
    answered = []

    def connect():
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_CONNECT_TIMEOUT_S)
    return bool(answered)


@functools.lru_cache(maxsize=None)
def _session_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fsdp_kd_hub_assets_"))


def _parquet_to_jsonl(source: Path, target: Path) -> None:
    import pyarrow.parquet as pq

    with open(target, "w", encoding="utf-8") as f:
        for row in pq.read_table(source).to_pylist():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
