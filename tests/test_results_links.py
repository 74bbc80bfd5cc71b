"""Every relative link in results/**/*.md resolves: to a committed file, or to a figure that
`bench report --index results --plots` draws (figures are not committed)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from bench.analysis.plots import figure_names

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@cache
def _drawn(run_dir: Path) -> frozenset[str]:
    """The figures the regenerate command draws in a run directory (none elsewhere)."""
    if not (run_dir / "results.csv").is_file():
        return frozenset()
    return frozenset(f"{name}.png" for name in figure_names(run_dir))


def broken_links(root: Path) -> list[str]:
    broken = []
    for page in sorted(root.glob("**/*.md")):
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # another site, or a heading of the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not (path.exists() or path.name in _drawn(path.parent)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    return broken


def test_every_link_in_results_resolves() -> None:
    assert broken_links(REPO / "results") == []
