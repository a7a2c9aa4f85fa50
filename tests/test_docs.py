"""The user documentation matches the code: the options page is generated from it, every
option and command is on it, and every link between the pages resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medbloom.cli import build_parser
from medbloom.config import ExperimentConfig
from medbloom.reference import options_page

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def test_the_options_page_is_the_generated_one() -> None:
    committed = (DOCS / "options.md").read_text(encoding="utf-8")
    assert committed == options_page(), "docs/options.md is stale: run `make docs`"


def test_every_experiment_option_is_documented_with_its_default() -> None:
    page = (DOCS / "options.md").read_text(encoding="utf-8")
    for f in ExperimentConfig.knobs():
        flag = f"--{ExperimentConfig.flag(f.name)}"
        row = next((ln for ln in page.splitlines() if ln.startswith(f"| `{flag}` |")), None)
        assert row is not None, f"{flag} is not in docs/options.md"
        default = "(empty)" if f.default == "" else f"`{f.default}`"
        assert f"| {default} |" in row, (flag, row)
        assert len(row.split("|")[3].strip()) > 10, f"{flag} has no real description"


def _leaf_commands(parser: object, path: str = "medbloom") -> list[str]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [c for n, p in action.choices.items() for c in _leaf_commands(p, f"{path} {n}")]
    return [path]


def test_every_command_and_its_flags_are_documented() -> None:
    page = (DOCS / "options.md").read_text(encoding="utf-8")
    commands = _leaf_commands(build_parser())
    assert "medbloom data audit" in commands and "medbloom run" in commands
    for command in commands:
        assert f"### `{command}`" in page, command
    # each documented flag has a meaning, not an empty cell
    for line in page.splitlines():
        if line.startswith("| `"):
            assert line.rstrip().rstrip("|").split("|")[-1].strip(), line


@pytest.mark.parametrize("page", [REPO / "README.md", REPO / "benchmarks" / "README.md", *PAGES])
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link to {target}"


def test_the_readme_is_a_landing_page_that_points_to_every_doc() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220
    for page in PAGES:
        assert f"docs/{page.name}" in readme, f"README does not point to docs/{page.name}"
    for command in ("make run", "make test"):
        assert command in readme
