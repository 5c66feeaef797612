"""`--help` on every entry point: exits 0, starts with a usage line and what the command does, and lists every option
with a meaning; train.py's list is exactly TrainConfig's keys, and every key is documented on its field."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, torchrun
from fsdp_kd import cache_teacher
from fsdp_kd.config import TrainConfig
from fsdp_kd.tokenized import TOKEN_SETTINGS

ENTRY_POINTS = {
    "train.py": [str(REPO / "train.py")],
    "cache_teacher": ["-m", "fsdp_kd.cache_teacher"],
    "export": ["-m", "fsdp_kd.export"],
    "demo": ["-m", "fsdp_kd.demo"],
    "prune": ["-m", "fsdp_kd.prune"],
}
COLUMNS = "120"  # the help wraps to the terminal's width: the same for every run here
# An option's line: two spaces, its name, an optional upper-case type, then its meaning (or nothing, when the name is
# too long and the meaning starts on the next line). Continuation lines are indented further.
ENTRY = re.compile(r"^  (\S+)(?: [A-Z]+(?: [A-Z]+)?)?(?: {2,}(\S.*))?$")


@pytest.fixture(scope="module")
def help_of(tmp_path_factory):
    """entry -> its `--help` run as a subprocess, from an empty directory (each entry point run once per module)."""
    runs = {}

    def run(entry: str) -> subprocess.CompletedProcess:
        if entry not in runs:
            cwd = tmp_path_factory.mktemp(entry.replace(".", "_"))
            env = {key: value for key, value in os.environ.items() if key != "RANK"}
            runs[entry] = subprocess.run([sys.executable, *ENTRY_POINTS[entry], "--help"], capture_output=True,
                                         text=True, timeout=120, cwd=cwd,
                                         env={**env, "PYTHONPATH": str(REPO), "COLUMNS": COLUMNS})
            runs[entry].cwd = cwd  # where it ran, to see that it wrote nothing
        return runs[entry]

    return run


def options(text: str) -> dict[str, str]:
    """{option name: its meaning} of a help text; the meaning's continuation lines joined."""
    found, last = {}, None
    for line in text.splitlines():
        match = ENTRY.match(line)
        if match:
            last = match.group(1)
            found[last] = match.group(2) or ""
        elif last and line.startswith("      ") and line.strip():
            found[last] = (found[last] + " " + line.strip()).strip()
        else:
            last = None
    return found


def test_every_key_has_a_one_line_meaning_and_a_section():
    fields = dataclasses.fields(TrainConfig)
    assert "section" in fields[0].metadata, "the first TrainConfig field must start a section (opt(..., section=))"
    undocumented = [f.name for f in fields if not f.metadata.get("help", "").strip()]
    assert not undocumented, f"TrainConfig fields without a help string (use opt(default, help)): {undocumented}"
    multiline = [f.name for f in fields if "\n" in f.metadata["help"]]
    assert not multiline, f"help strings must be one line: {multiline}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_exits_zero_with_usage_summary_and_documented_options(entry, help_of):
    proc = help_of(entry)
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage, summary = proc.stdout.split("\n\n")[:2]
    assert usage.startswith("usage: ") and "\n" not in usage
    assert summary.endswith(".") and ". " not in summary.replace("\n", " "), summary  # one sentence
    listed = options(proc.stdout)
    assert listed and all(listed.values()), f"options without a meaning: {[k for k, v in listed.items() if not v]}"
    assert not os.listdir(proc.cwd), "--help must not run anything (train.py with no arguments runs the demo)"


@pytest.mark.parametrize("module", ["cli", "cache_teacher", "export", "demo", "prune"])
def test_dash_h_is_the_same_help(module, help_of, capsys, monkeypatch):
    import importlib

    monkeypatch.setenv("COLUMNS", COLUMNS)
    entry = {"cli": "train.py"}.get(module, module)
    assert importlib.import_module(f"fsdp_kd.{module}").main(["-h"]) == 0
    assert capsys.readouterr().out == help_of(entry).stdout


def test_train_help_lists_exactly_the_config_keys_by_section(help_of):
    proc = help_of("train.py")
    assert set(options(proc.stdout)) == {f"--{f.name}" for f in dataclasses.fields(TrainConfig)}
    sections = [f.metadata["section"] for f in dataclasses.fields(TrainConfig) if "section" in f.metadata]
    headers = [line[:-1] for line in proc.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headers == sections
    listed = options(proc.stdout)
    for f in dataclasses.fields(TrainConfig):
        assert listed[f"--{f.name}"].startswith(f.metadata["help"] + " [default: "), f.name
    assert listed["--max_len"].endswith(f"[default: {TrainConfig.max_len}]")
    assert listed["--adam_betas"].endswith(f"[default: {' '.join(map(str, TrainConfig.adam_betas))}]")
    assert listed["--teacher_model"].endswith("[default: none]")


def test_cache_teacher_help_lists_the_keys_it_reads(help_of):
    """The keys CacheBuilder reads itself (`cfg.KEY` in its source) and the tokenization settings it records must
    be in the list its --help prints; the list holds nothing else."""
    read = set(re.findall(r"\bcfg\.([a-z_]+)\b", open(cache_teacher.__file__).read()))
    assert read <= set(cache_teacher.KEYS) and set(TOKEN_SETTINGS) <= set(cache_teacher.KEYS)
    assert set(options(help_of("cache_teacher").stdout)) == {f"--{key}" for key in cache_teacher.KEYS}


def test_demo_and_export_help_name_their_arguments(help_of):
    assert {"--out", "--seed", "--teacher_steps", "--student_steps", "--train_samples"} == set(
        options(help_of("demo").stdout))
    assert {"CHECKPOINT", "OUT_DIR"} == set(options(help_of("export").stdout))


def test_under_torchrun_only_rank_0_prints(tmp_path):
    proc = torchrun([str(REPO / "train.py"), "--help"], nproc=2, cwd=tmp_path)
    assert proc.stdout.count("usage: ") == 1, proc.stdout[:2000]
