"""Every relative link in README.md and docs/**/*.md points at a file or folder that ships with the repo, and a
`#fragment` into a Markdown page names one of its headings (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Pages another tool generates from the typed config; linked before they exist, checked once they do.
GENERATED = {ROOT / "docs" / "config.md", ROOT / "docs" / "parameters.sample.yml"}

INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")
CODE_SPAN = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside fenced code blocks and code spans."""
    found: list[tuple[int, str]] = []
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        text = CODE_SPAN.sub("", line)
        for pattern in (INLINE, REFERENCE, HTML):
            found.extend((number, m.group(1)) for m in pattern.finditer(text))
    return found


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    rel = path.relative_to(ROOT)
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{rel}:{number}: {target} points outside the repository")
        elif not resolved.exists():
            if resolved not in GENERATED:
                problems.append(f"{rel}:{number}: {target} does not exist")
        elif fragment and resolved.suffix == ".md" and unquote(fragment).lower() not in anchors(resolved):
            problems.append(f"{rel}:{number}: {target}: no heading with the anchor #{fragment}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_docs_exist():
    assert (ROOT / "docs" / "index.md").is_file()
    assert len(doc_files()) > 2


@pytest.mark.parametrize("page", sorted(GENERATED), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_pages(page: Path):
    linked = any(
        not EXTERNAL.match(t) and (path.parent / t.split("#")[0]).resolve() == page
        for path in doc_files()
        for _, t in links(path)
    )
    if not linked:
        pytest.skip(f"{page.relative_to(ROOT)} is not linked")
    if not page.exists():
        pytest.skip(f"{page.relative_to(ROOT)} is generated from the typed config and has not been generated yet")
