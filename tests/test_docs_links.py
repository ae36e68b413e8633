"""Every relative link and anchor in the documentation resolves (no network: web links are not followed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "pretrained" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    return _CODE.sub("", _FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to '-', repeats '-1'..."""
    seen: dict[str, int] = {}
    result = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """The relative links of one file whose file or anchor does not exist."""
    broken = []
    for target in _LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_anchor_rule_is_githubs():
    path = ROOT / "pretrained" / "README.md"
    assert "lefusion_sampler_phantompt--lefusion-lesion-texture-sampler" in anchors(path)
    assert "history-of-the-sampler" in anchors(path)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title: one\n\n[ok](#title-one) [bad](#nothing) [gone](b.md) `[code](c.md)`\n"
                                   "```\n[fenced](d.md)\n```\n[web](https://example.org/x.md)\n")
    assert broken_links(tmp_path / "a.md") == ["#nothing (no such heading)", "b.md (no such file)"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert path.exists()
    assert broken_links(path) == []


def test_the_readme_is_a_front_page_of_about_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210
