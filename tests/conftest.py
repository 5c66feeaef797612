"""Shared fixtures: tiny models and data built from configs and saved with save_pretrained, and a torchrun runner.

Nothing is downloaded. Models are Llama- and Qwen2-shaped, a few layers, over the demo's character tokenizer. Tests
whose point is a real tokenizer or data set get it from `assets.real_asset`, which skips them where it is missing;
the summary hook below counts those skips.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from assets import SKIP_PREFIX

REPO = Path(__file__).resolve().parents[1]
# Tokenized data goes to a cache of this test session (torchrun children inherit it), never to ~/.cache.
os.environ.setdefault("FSDP_KD_DATA_CACHE", tempfile.mkdtemp(prefix="fsdp_kd_tokenized_"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{'tok', 'teacher', 'student', 'qwen_teacher', 'qwen_student', 'train', 'eval'} paths."""
    from fsdp_kd.testing.tiny import build_char_tokenizer, build_tiny_model, translation_task, write_jsonl

    root = tmp_path_factory.mktemp("tiny")
    paths = {"tok": str(root / "tok")}
    tok = build_char_tokenizer(paths["tok"])
    for name, hidden, layers, family, seed, tie in (
            ("teacher", 64, 2, "llama", 1, False), ("student", 32, 2, "llama", 2, False),
            ("qwen_teacher", 64, 2, "qwen2", 3, True), ("qwen_student", 32, 2, "qwen2", 4, True)):
        paths[name] = str(root / name)
        build_tiny_model(paths[name], len(tok), hidden, layers, family=family, seed=seed, tie=tie)
        if "teacher" in name:
            _sharpen_output_head(paths[name])
        tok.save_pretrained(paths[name])
    paths["train"] = str(root / "train.jsonl")
    paths["eval"] = str(root / "eval.jsonl")
    train, held_out, _ = translation_task(0, 256, 24)
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], held_out)
    return paths


PAIRS = ("AB", "CD", "EF", "GH", "ab", "cd")
TEACHER_PAIRS = ("BC", "DE", "AB", "IJ", "ba")  # AB is both sides' token


@pytest.fixture(scope="session")
def pair_student(tiny, tmp_path_factory):
    """A tiny student over the character tokenizer plus `PAIRS` (a tokenizer of its own)."""
    from fsdp_kd.testing.tiny import build_char_tokenizer, build_tiny_model

    path = str(tmp_path_factory.mktemp("pair_student"))
    tok = build_char_tokenizer(path, pairs=PAIRS)
    build_tiny_model(path, len(tok), 32, 2, seed=5)
    return path


@pytest.fixture(scope="session")
def pair_teacher(tmp_path_factory):
    """A tiny teacher over the characters plus pairs of its own (`TEACHER_PAIRS`), its head sharpened: each side then
    has tokens the other lacks, so both rest buckets hold mass (the general case, as Qwen against SmolLM)."""
    from fsdp_kd.testing.tiny import build_char_tokenizer, build_tiny_model

    path = str(tmp_path_factory.mktemp("pair_teacher"))
    tok = build_char_tokenizer(path, pairs=TEACHER_PAIRS)
    build_tiny_model(path, len(tok), 64, 2, seed=6)
    _sharpen_output_head(path)
    return path


# ChatML's shape in characters the character tokenizer has (its <|...|> would be unknown tokens)
CHAR_CHAT = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def chat_bpe_tok(tmp_path_factory) -> str:
    """Path of a byte-level BPE tokenizer trained here, with a ChatML chat template (eos <|im_end|>, pad
    <|endoftext|>): a chat tokenizer for tests that need one but not a particular real one. It differs from the
    character tokenizer from id 0 on and has more ids (256 bytes and merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([f"{r['question']} {r['answer']}" for r in qa_records(200, seed=99)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    path = str(tmp_path_factory.mktemp("chat_bpe_tok"))
    tok.save_pretrained(path)
    return path


def qa_records(n: int, seed: int = 0) -> list[dict]:
    """`n` {"question", "answer"} records of English words, questions of 3 to 60 words and answers of 2 to 120:
    uneven lengths, some over a max_len of 128 tokens, for tests of truncation and packing without real data."""
    rng = random.Random(seed)
    words = ("the a an one two three four five six seven eight nine ten apples pears costs sells buys has how many "
             "much is are does what total each every day week more less than and then so answer left").split()

    def text(low, high):
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    return [{"question": text(3, 60).capitalize() + "?", "answer": text(2, 120) + f". #### {rng.randint(0, 99)}"}
            for _ in range(n)]


def _sharpen_output_head(path: str, scale: float = 20.0) -> None:
    """A random tiny model predicts near-uniformly, leaving nothing to distil; a scaled head gives it opinions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# Set in this process by pytest (the test in progress) and by torch's compiler (its cache, a tensor's address), not
# by a test
_PROCESS_LOCAL = ("PYTEST_", "TORCHINDUCTOR_", "_TORCHINDUCTOR_")


def _hosts_env_holds(env: dict[str, str]) -> bool:
    """Whether a case with `env` may run on a host: its environment is the hosts'. The variables that differ are
    noted for the summary, so a variable set by accident, which would send every later case to a process of its
    own, shows."""
    differ = {k for k in env.keys() ^ _HOST_ENV.keys() | {k for k in env if env[k] != _HOST_ENV.get(k)}
              if not k.startswith(_PROCESS_LOCAL)}
    LAUNCHES["for_variables"].update(differ)
    return not differ


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240, check: bool = True, cwd=None, fresh: bool = False):
    """Runs `torchrun --nproc_per_node nproc ARGS` on gloo; returns the CompletedProcess.

    What a case host can run (train.py, cache_teacher, export, the test workers) runs on the host of that world size
    (tests/case_host.py), as torchrun would: the same exit status (0, or 1 when any rank failed) and every rank's
    output. `fresh=True`, arguments for torchrun itself, or an environment changed since the hosts started (libraries
    read some variables, such as HF_HUB_OFFLINE, once at import) launch a torchrun of its own."""
    if not fresh and _hostable(args) and _hosts_env_holds(_launch_env()):
        proc = _host(nproc).run(args, cwd, timeout)
        proc.returncode = 0 if all(code == 0 for code in proc.codes) else 1
    else:
        LAUNCHES["own"] += 1
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_launch_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def python_run(args: list[str], cwd=None, timeout: int = 180, fresh: bool = False, **extra_env):
    """`python ARGS` (train.py, `-m fsdp_kd.cache_teacher`, `-m fsdp_kd.export`): a world of one, run on the case host
    of one rank; its exit status is the process's own (2 for bad input). `fresh=True` (what a plain process does
    itself: its own process group, import-time warnings, its exit), `extra_env`, or an environment changed since the
    hosts started run it as a process of its own, as `torchrun` does."""
    env = {**_launch_env(), **extra_env}
    if fresh or not _hosts_env_holds(env):
        LAUNCHES["own"] += 1
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=env)
    proc = _host(1).run(args, cwd, timeout)
    proc.returncode = proc.codes[0]
    return proc


_HOSTED_SCRIPTS = ("train.py", "dist_worker.py", "sweep_worker.py")
_HOSTED_MODULES = ("fsdp_kd.cache_teacher", "fsdp_kd.export")


def _hostable(args: list[str]) -> bool:
    if args[0] == "-m":
        return args[1] in _HOSTED_MODULES
    return not args[0].startswith("-") and os.path.basename(args[0]) in _HOSTED_SCRIPTS


class CaseHost:
    """One `torchrun tests/case_host.py` job of `world` ranks, and the cases handed to it in turn."""

    START_TIMEOUT = 180

    def __init__(self, world: int):
        self.world = world
        self.inbox = tempfile.mkdtemp(prefix=f"fsdp_kd_host{world}_")
        self.cases = 0
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(_free_port()), str(REPO / "tests" / "case_host.py"), self.inbox, str(os.getpid())]
        self.log = open(os.path.join(self.inbox, "host.log"), "w")
        self.proc = subprocess.Popen(cmd, env=_HOST_ENV, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    # After a rank fails, how long the others get to finish before the host is stopped, as torchrun stops the rest
    # of a job within seconds of a failed worker (a rank can be blocked in a collective the failed one never joins)
    FAILED_RANK_GRACE = 5.0

    def run(self, argv, cwd, timeout) -> subprocess.CompletedProcess:
        """Case `argv` run from `cwd` (default: this process's working directory): a CompletedProcess with every
        rank's output in rank order and `codes`, each rank's exit status (-15 for a rank stopped after another
        failed, or lost with its host). Raises TimeoutExpired, as subprocess.run does, when the case runs past
        `timeout`."""
        import time

        n, self.cases = self.cases, self.cases + 1
        LAUNCHES["hosted"] += 1
        case = {"argv": [str(a) for a in argv], "cwd": str(cwd or os.getcwd())}
        tmp = os.path.join(self.inbox, f"{n}.tmp")
        with open(tmp, "w") as f:
            json.dump(case, f)
        os.replace(tmp, os.path.join(self.inbox, f"{n}.json"))
        stems = [os.path.join(self.inbox, f"{n}.rank{r}") for r in range(self.world)]
        deadline = time.time() + timeout + (self.START_TIMEOUT if n == 0 else 0)
        codes: list[int | None] = [None] * self.world
        stop_at = None  # once a rank has failed, when the ranks still running are stopped
        while None in codes:
            for r, stem in enumerate(stems):
                if codes[r] is None and os.path.exists(stem + ".json"):
                    codes[r] = json.loads(_read(stem + ".json"))["code"]
            if stop_at is None and any(codes):
                stop_at = time.time() + self.FAILED_RANK_GRACE
            if None not in codes or self.proc.poll() is not None or (stop_at and time.time() > stop_at):
                break
            if time.time() > deadline:
                output = "".join(_read(stem + ".out") + _read(stem + ".err") for stem in stems)
                self.stop(kill=True)
                raise subprocess.TimeoutExpired(["case", *case["argv"]], timeout, output + _read(self.log.name))
            time.sleep(0.01)
        out, err = ("".join(_read(stem + suffix) for stem in stems) for suffix in (".out", ".err"))
        if None in codes:  # ranks left in a collective after another failed, or a host that died: stopped with it
            if self.proc.poll() is not None:
                err += f"\ncase host of {self.world} ranks ended (exit {self.proc.returncode}); its log:\n" \
                       f"{_read(self.log.name)[-3000:]}"
            self.stop(kill=True)
            codes = [-15 if code is None else code for code in codes]
        proc = subprocess.CompletedProcess(["case", *case["argv"]], 0, out, err)
        proc.codes = codes
        return proc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        import signal

        if self.alive() and not kill:
            with open(os.path.join(self.inbox, f"{self.cases}.json"), "w") as f:
                json.dump({"stop": True}, f)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill = True
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        if not kill:
            shutil.rmtree(self.inbox, ignore_errors=True)


_HOSTS: dict[int, CaseHost] = {}
LAUNCHES = {"hosted": 0, "own": 0, "hosts": 0, "for_variables": set()}  # for the summary line: what ran where
_HOST_ENV = _launch_env()  # every host's, taken once the data cache variable above is set


def _host(world: int) -> CaseHost:
    """The case host of `world` ranks, started on first use and again after one was killed."""
    if world not in _HOSTS or not _HOSTS[world].alive():
        _HOSTS[world] = CaseHost(world)
        LAUNCHES["hosts"] += 1
    return _HOSTS[world]


# A full pass of the garbage collector walks every object alive: in this process torch's and transformers' modules,
# and a real tokenizer's 150k-entry vocabularies held by a module's fixtures, walked again some hundred times a file
# (a third of test_cross_tokenizer.py's time). What is alive once the tests are imported, and what a test's fixtures
# have built, is frozen (no longer walked; still freed when its last reference goes), after a collection of the
# young objects so that no garbage of the test before is frozen with it; each module's cycles are collected as it
# ends.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def pytest_sessionfinish(session):
    for host in _HOSTS.values():
        host.stop()


def start_torchrun(args, nproc=2):
    """`torchrun` in the background, stdout and stderr merged, in a session of its own (so it can be killed whole)."""
    LAUNCHES["own"] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), *args]
    return subprocess.Popen(cmd, env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(path, proc, timeout=120, ready=os.path.exists):
    """Waits until `ready(path)`; fails if the run ends first or the timeout passes."""
    import time

    deadline = time.time() + timeout
    while not ready(path):
        assert proc.poll() is None, f"run ended before {path} was ready:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} was not ready in {timeout}s"
        time.sleep(0.01)


def has_lines(path) -> bool:
    return os.path.exists(path) and os.path.getsize(path) > 0


def end_after(fault, proc) -> tuple[str, float]:
    """Runs `fault()` against a running job, then waits for torchrun to end it: (its output, seconds from the fault
    to the end)."""
    import time

    fault()
    fault_at = time.time()
    output, _ = proc.communicate(timeout=120)
    return output, time.time() - fault_at


def read_metrics(save_path) -> list[dict]:
    with open(Path(save_path) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_args(tiny, save_path, **overrides) -> list[str]:
    """train.py flags for a short KD run on the tiny models; overrides win."""
    flags = {"pretrain": tiny["student"], "teacher_model": tiny["teacher"], "dataset": tiny["train"],
             "train_batch_size": 16, "micro_train_batch_size": 4, "max_steps": 4, "learning_rate": 3e-3,
             "kd_coef": 0.5, "save_path": str(save_path), "lr_warmup_ratio": 0.0}
    flags.update(overrides)
    out = []
    for k, v in flags.items():
        if v is None:
            continue
        out += [f"--{k}", str(v)]
    return out


def pytest_terminal_summary(terminalreporter):
    """A line of what ran where (on case hosts, or in processes of their own), and one when tests were skipped for
    missing real assets (`assets.real_asset`): how many and which."""
    if LAUNCHES["hosted"] or LAUNCHES["own"]:
        changed = sorted(LAUNCHES["for_variables"])
        terminalreporter.write_line(f"{LAUNCHES['hosted']} runs on {LAUNCHES['hosts']} case hosts, "
                                    f"{LAUNCHES['own']} in processes of their own"
                                    + (f" (some for the environment variables {', '.join(changed)})" if changed else ""))
    reasons = [report.longrepr[2] for report in terminalreporter.stats.get("skipped", [])
               if isinstance(report.longrepr, tuple)]
    names = [m.group(1) for m in (re.search(rf"{SKIP_PREFIX}(\S+):", r) for r in reasons) if m]
    if names:
        terminalreporter.write_line(
            f"{len(names)} tests skipped for missing real assets: {', '.join(sorted(set(names)))}; see README.md, "
            "the paragraph under the test command")
