"""docs/methods.md is the repository's method reference: every citation of it points to a heading that exists."""
from __future__ import annotations

import re

from helpers import REPO

CITED_IN = ("*.py", "*.md", "*.yaml")  # sources, docs, recipes
SKIP = {".venv", ".git", "node_modules", "build", "dist"}
CITATION = re.compile(r"docs/methods\.md#([A-Za-z0-9_-]+)")


def _files():
    for pattern in CITED_IN:
        for path in REPO.rglob(pattern):
            rel = path.relative_to(REPO)
            if not SKIP.intersection(rel.parts) and not any(p.endswith(".egg-info") for p in rel.parts):
                yield path


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())  # inline markup
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def doc_anchors() -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in (REPO / "docs" / "methods.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"#{1,6} (.+)", line)
        if m and not fenced:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            anchors.add(base if n == 0 else f"{base}-{n}")  # repeated headings get -1, -2...
            seen[base] = n + 1
    return anchors


def test_github_anchor():
    assert github_anchor("n:m:g") == "nmg"
    assert github_anchor("FFN FLOPs per token") == "ffn-flops-per-token"
    assert github_anchor("Block-wise L1") == "block-wise-l1"


def test_every_cited_anchor_exists():
    anchors = doc_anchors()
    missing = []
    for path in _files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for anchor in CITATION.findall(line):
                if anchor not in anchors:
                    missing.append(f"{path.relative_to(REPO)}:{i}: #{anchor}")
    assert not missing, "citations of docs/methods.md headings that do not exist:\n" + "\n".join(missing)


def test_markdown_links_inside_methods_md_resolve():
    anchors = doc_anchors()
    text = (REPO / "docs" / "methods.md").read_text()
    bad = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    assert not bad, bad


def test_no_file_cites_the_external_digest():
    digest = "METHODS" + ".md"  # spelled apart so this file does not cite it
    citing = [f"{p.relative_to(REPO)}:{i}" for p in _files()
              for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if digest in line]
    assert not citing, f"{digest} lives outside the repository; cite docs/methods.md instead: {citing}"
