"""Shared by the benchmarks: put a result table into docs/benchmarks.md under its own section."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEach section is written by the script named in it; numbers are from the machine stated.\n"


def replace_section(path: str | Path, title: str, body: str) -> None:
    """Replace (or append) the `## {title}` section of a Markdown file, leaving the others alone."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
