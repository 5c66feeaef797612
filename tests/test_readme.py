"""The README's two copy-paste lines stay true: CI runs the test line verbatim, and shipped configs parse. The README's
and docs/' links and the repository paths they name lead somewhere."""

import re

import pytest

from fsdp_kd.config import parse_config

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:fsdp_kd|bench|tests|configs|docs)/[\w./-]*\w)")
MODULE = re.compile(r"-m (fsdp_kd(?:\.\w+)+)")


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


def heading_anchors(text):
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated heading numbered from -1."""
    anchors, seen, in_code = set(), {}, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_heading_anchors_follow_github():
    text = "# The teacher on its own ranks (`--teacher_ranks N`)\n```\n# not a heading\n```\n## Data\n## Data\n"
    assert heading_anchors(text) == {"the-teacher-on-its-own-ranks---teacher_ranks-n", "data", "data-1"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_lead_to_a_file_and_heading(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        dest = doc.parent / path if path else doc
        if not dest.exists() or anchor and anchor not in heading_anchors(dest.read_text()):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: links that lead nowhere: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_repository_paths_and_modules_exist(doc):
    text = doc.read_text()
    missing = [p for p in REPO_PATH.findall(text) if not (REPO / p).exists()]
    missing += [m for m in MODULE.findall(text) if not (REPO / (m.replace(".", "/") + ".py")).exists()]
    assert not missing, f"{doc.relative_to(REPO)} names what the repository does not hold: {sorted(set(missing))}"
