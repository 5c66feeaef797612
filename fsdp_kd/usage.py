"""`--help` for every entry point in one layout: a usage line, one sentence on what the command does, then its options
grouped by section, each with its type, default and one-line meaning.

train.py and cache_teacher list TrainConfig's keys, whose meanings live on the fields (`config.opt`); export and the
demo list their argparse arguments. Under torchrun every rank sees the same command line, and only rank 0 prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import textwrap
from collections.abc import Collection
from dataclasses import dataclass

HELP_FLAGS = ("-h", "--help")
KEYS_NOTE = ("Keys come from a YAML file (--config FILE.yaml) and --key value flags on top of it; flags win. A BOOL "
             "key alone (--teacher_offload) means true; none empties a key whose default is none.")


@dataclass(frozen=True)
class Option:
    name: str  # "--max_len", or "CHECKPOINT" for a positional argument
    type: str  # "INT", "STR", ...; "" where the name says it
    default: str | None  # as it would be typed on the command line; None: required
    help: str


Sections = list[tuple[str, list[Option]]]


def asks_for_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def print_help(text: str) -> int:
    """Prints on rank 0 only (every rank of a torchrun job parses the same argv); the exit code, 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, end="", flush=True)
    return 0


def key_sections(keys: Collection[str] | None = None) -> Sections:
    """TrainConfig's keys (all, or those in `keys`) in field order, under the section each field falls in."""
    from .config import FIELDS, TrainConfig, type_name

    unknown = set(keys or ()) - FIELDS.keys()
    if unknown:
        raise ValueError(f"not TrainConfig keys: {', '.join(sorted(unknown))}")
    sections: Sections = []
    for f in dataclasses.fields(TrainConfig):
        if "section" in f.metadata:
            sections.append((f.metadata["section"], []))
        if keys is None or f.name in keys:
            meaning = f.metadata.get("help", "")  # never missing: tests/test_help.py
            sections[-1][1].append(Option(f"--{f.name}", type_name(f.name), _shown(f.default), meaning))
    return [(title, options) for title, options in sections if options]


def parser_sections(parser: argparse.ArgumentParser, title: str = "Arguments") -> Sections:
    """An argparse parser's arguments (built with add_help=False: -h is this module's) as one section."""
    options = []
    for action in parser._actions:  # argparse has no public list of its arguments
        if action.option_strings:
            name = max(action.option_strings, key=len)
            kind = "" if action.nargs == 0 else (action.metavar or getattr(action.type, "__name__", "str").upper())
            options.append(Option(name, kind, _shown(action.default), action.help or ""))
        else:
            options.append(Option(action.metavar or action.dest.upper(), "", None, action.help or ""))
    return [(title, options)]


def _shown(value) -> str:
    """A default as it would be typed: none, true/false, two numbers for a pair, "" for the empty string."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value) if value != "" else '""'


def render(usage: str, summary: str, sections: Sections, note: str = "") -> str:
    """The help text: `usage: ...`, the summary, an optional note, then one entry per option (wrapped lines are
    indented under the meaning, so an option's name is the only thing at the start of a line)."""
    width = max(80, min(shutil.get_terminal_size((120, 24)).columns, 120))
    heads = {option: f"  {option.name} {option.type}".rstrip() for _, options in sections for option in options}
    column = min(max(map(len, heads.values()), default=0) + 2, 34)
    lines = [f"usage: {usage}", "", *textwrap.wrap(summary, width)]
    if note:
        lines += ["", *textwrap.wrap(note, width)]
    for title, options in sections:
        lines += ["", f"{title}:"]
        for option in options:
            default = "" if option.default is None else f"[default: {option.default}]".replace(" ", _UNBROKEN)
            head = heads[option]
            if len(head) + 2 > column:  # a long name gets a line of its own
                lines.append(head)
                head = ""
            lines += [line.replace(_UNBROKEN, " ") for line in textwrap.wrap(
                f"{option.help} {default}", width, initial_indent=head.ljust(column), subsequent_indent=" " * column)]
    return "\n".join(lines) + "\n"


_UNBROKEN = "\xa0"  # textwrap breaks lines at ASCII spaces only: "[default: X]" is never split
