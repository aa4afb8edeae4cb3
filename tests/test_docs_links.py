"""The documentation holds together: every relative link in README.md and docs/*.md points to a
file of the repository and, for a Markdown file, to a heading that exists there (the anchor
GitHub makes from it); and no page cites a specification outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, code spans and links reduced to their text,
    every character that is not a letter, digit, space, hyphen or underscore removed (``*`` of
    emphasis too), spaces made hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text) + _IMAGE.findall(text)


def test_slugs_as_github_makes_them():
    assert github_slug("GPU performance model (predictions, not measurements)") == (
        "gpu-performance-model-predictions-not-measurements")
    assert github_slug("Sharded sites (`process_group`)") == "sharded-sites-process_group"
    assert github_slug("Multi-GPU: tokens split across devices") == (
        "multi-gpu-tokens-split-across-devices")
    assert github_slug("`fuse_residual_groups`, `FusionSettings`") == (
        "fuse_residual_groups-fusionsettings")
    assert github_slug("What was checked, and what is still unrun") == (
        "what-was-checked-and-what-is-still-unrun")


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = broken_links(page)
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_a_broken_link_or_anchor_is_found(tmp_path: Path):
    (tmp_path / "b.md").write_text("# Some heading\n\n## `code`, here\n", encoding="utf-8")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#code-here) [ok](b.md) [ok](#top) [bad](b.md#nothing) "
                    "[bad](c.md) ![bad](img.png)\n\n# Top\n\n```\n[in code](x.md)\n```\n",
                    encoding="utf-8")
    assert broken_links(page) == ["b.md#nothing: no heading with anchor #nothing in b.md",
                                  "c.md: no such file", "img.png: no such file"]


def test_the_pages_have_links_to_check():
    assert sum(len(links(p)) for p in PAGES) > 50


def test_nothing_cites_a_specification_outside_the_repository():
    name, words = "SPEC" + ".md", "shared " + "specification"
    hits = []
    for path in ROOT.rglob("*"):
        if path.suffix not in {".md", ".py", ".json", ".toml"} or not path.is_file():
            continue
        if {".git", ".venv", "build", "dist"} & set(path.relative_to(ROOT).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if name in text or words in text:
            hits.append(str(path.relative_to(ROOT)))
    assert not hits, f"cite {name} (outside the repository) instead of docs/spec.md: {hits}"
