"""The README's two copy-paste lines stay true: CI runs the test line verbatim, and shipped configs parse."""

import re

import pytest

from fsdp_kd.config import parse_config

from conftest import REPO


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())[:2]


def test_ci_runs_the_readme_test_line_verbatim():
    demo_line, test_line = readme_commands()
    ci_script = (REPO / ".ci" / "run").read_text()
    assert test_line in ci_script.splitlines()
    assert demo_line.endswith("torchrun --nproc_per_node 2 train.py")


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config):
    cfg = parse_config(["--config", str(config)])
    assert cfg.pretrain and cfg.dataset
