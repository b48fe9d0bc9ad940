"""The project's manual as the tests read it: README.md first, then the pages of docs/.

Tests that check what the documentation says (a command, a variable, a label) read it here, so
that a fact may live on whichever page suits it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, in a stable order."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def text() -> str:
    """The whole manual as one text."""
    return "\n\n".join(page.read_text() for page in pages())


def configuration_variables() -> set[str]:
    """The variables named in the first column of docs/configuration.md's tables."""
    table = (DOCS / "configuration.md").read_text()
    return set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))


def configuration_rows() -> dict[str, list[str]]:
    """docs/configuration.md's rows by variable: the cells after the name."""
    rows: dict[str, list[str]] = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        match = re.match(r"^\| `(\w+)` \|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows
