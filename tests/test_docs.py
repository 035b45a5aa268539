"""The README and docs/: every local link and image resolves, the README stays a front door (short), and the two
command blocks CI reads are there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 320

# [text](target) and ![alt](target); the target ends at whitespace or ")" (titles and nested parentheses are not used)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without code blocks and inline code, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def local_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in local_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_local_link_resolves(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Some `code` heading: here\n")
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n[ok](there.png) ![gone](missing.png) [web](https://example.com) [self](#top)\n"
                   "[a](other.md#some-code-heading-here) [b](other.md#nowhere) [c](#nowhere)\n"
                   "`[not a link](missing-too.png)`\n```\n[nor this](missing-three.png)\n```\n")
    assert broken_links(doc) == ["missing.png: no such file",
                                 "other.md#nowhere: no heading with that anchor in other.md",
                                 "#nowhere: no heading with that anchor in doc.md"]


def test_readme_is_a_front_door() -> None:
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; measurements go to docs/benchmarks.md"


@pytest.mark.parametrize("name", ["main-command", "test-command"])
def test_readme_keeps_its_command_blocks(name: str) -> None:
    """.ci/run reads the test command from between these markers; the main command is the one a user runs."""
    block = re.search(rf"^<!-- {name} -->\n```bash\n(.+)\n```\n<!-- /{name} -->$", (ROOT / "README.md").read_text(),
                      re.M)
    assert block is not None and block.group(1).startswith("python3 -m venv .venv && ")


def readme_commands() -> list[list[str]]:
    """Every `featurelens ...` line of the README's bash blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["featurelens"]:
                commands.append(words[1:])
    return commands


def test_readme_cli_examples_parse() -> None:
    """The README's command lines are accepted by the CLI's parser (a renamed flag shows up here)."""
    from featurelens.cli import build_parser

    commands = readme_commands()
    assert len(commands) > 20
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's `featurelens {shlex.join(argv)}` does not parse")
