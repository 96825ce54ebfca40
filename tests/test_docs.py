"""The documentation stays true to the repository: README.md is short, every relative link in
README.md and docs/ points at a file (and heading) that exists, and every `flm` command the
README names answers `--help`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKDOWN = [README, *sorted((REPO / "docs").rglob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FLM_COMMAND = re.compile(r"\bflm ((?:bench )?[a-z][a-z-]*)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where `[x](y)` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _code(text: str) -> list[str]:
    """The contents of fenced code blocks and code spans."""
    blocks = [match.group(0) for match in FENCE.finditer(text)]
    spans = [match.group(0) for match in INLINE_CODE.finditer(FENCE.sub("", text))]
    return blocks + spans


def _relative_links(path: Path) -> list[str]:
    targets = LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [target for target in targets
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) and not target.startswith("#")]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_the_readme_is_at_most_300_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it at most {README_MAX_LINES} and move detail into docs/")


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_an_existing_file(path):
    broken = []
    for target in _relative_links(path):
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)} links to files that do not exist: {broken}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_anchor_into_another_markdown_file_is_a_heading_there(path):
    broken = []
    for target in _relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = path.parent / file_part
        if anchor and linked.suffix == ".md" and linked.is_file() and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)} links to headings that do not exist: {broken}"


def test_the_link_and_command_patterns_find_what_they_should():
    text = "See [a](docs/a.md#x), [b](https://x.org), [c](#top) and `[d](not/a/link.md)`.\n" \
           "```bash\nflm bench topk --items 1\nflm run jobs/x.yaml  # [e](no.md)\n```\n`flm_dist` `flm compare A B`\n"
    assert LINK.findall(_prose(text)) == ["docs/a.md#x", "https://x.org", "#top"]
    assert sorted({m for code in _code(text) for m in FLM_COMMAND.findall(code)}) == [
        "bench topk", "compare", "run"]
    assert _slug("Prepare (`flm bench prepare`)") == "prepare-flm-bench-prepare"
    assert _slug("Three ways to run: locally, job files, a Ray cluster") == \
        "three-ways-to-run-locally-job-files-a-ray-cluster"


def test_every_flm_command_the_readme_names_answers_help(capsys):
    from flm_dist.cli.main import build_parser

    commands = sorted({match for code in _code(README.read_text(encoding="utf-8"))
                       for match in FLM_COMMAND.findall(code)})
    assert "prepare" in commands and "bench train" in commands, commands
    failed = {}
    for command in commands:
        parser = build_parser()
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*command.split(), "--help"])
        if exited.value.code not in (0, None):
            failed[command] = exited.value.code
    capsys.readouterr()
    assert not failed, f"`flm ... --help` did not exit with status 0 for: {failed}"
