"""Every relative link and image in the README and docs/ points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://", t)]
    missing = [t for t in targets if t and not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
