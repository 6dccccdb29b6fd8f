"""Every relative link in the README, docs/ and the committed result pages leads somewhere: the file
exists, and a `#anchor` names a heading of the linked page (GitHub's heading slugs)."""

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "results").rglob("*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]*)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lowercased, spaces to
    hyphens (letters of any script, digits, `_` and `-` kept)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose_lines(page: Path):
    """(line number, line) of a page's lines outside fenced code blocks."""
    in_code = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            yield number, line


@functools.cache
def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(page):
        if m := HEADING.match(line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of each link that is not a URL, outside code."""
    links = []
    for number, line in prose_lines(page):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in LINK.findall(line):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                links.append((number, target))
    return links


def broken(page: Path) -> list[str]:
    problems = []
    for number, target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}:{number}"
        if not target:
            problems.append(f"{where}: empty link")
        elif not dest.exists():
            problems.append(f"{where}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {target} (no such heading)")
    return problems


def test_slug_follows_github():
    heading = "Peak lr 3e-3 and no label smoothing, on the lr 2e-3 default (CPU, 3,500 updates)"
    assert (
        slug(heading)
        == "peak-lr-3e-3-and-no-label-smoothing-on-the-lr-2e-3-default-cpu-3500-updates"
    )
    assert slug("Results (Multi30k test2016, de→en)") == "results-multi30k-test2016-deen"
    assert slug("`trainer.final`: what is *chosen*") == "trainerfinal-what-is-chosen"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Only heading\n## Twice\n## Twice\n")
    page.write_text(
        "[ok](other.md#only-heading) [ok](other.md#twice-1) `[code](gone.md)`\n"
        "[bad anchor](other.md#missing) [bad file](gone.md) [web](https://example.org)\n"
        "[empty]()\n"
    )
    assert broken(page) == [
        "page.md:2: other.md#missing (no such heading)",
        "page.md:2: gone.md (no such file)",
        "page.md:3: empty link",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert broken(page) == []


def test_every_benchmark_table_is_listed_on_the_bench_page():
    """results/bench/README.md links every file of its folder, so a table committed from a
    GPU run is described there, not left for a reader to find."""
    bench = ROOT / "results" / "bench"
    linked = {
        (bench / target.partition("#")[0]).resolve()
        for _, target in relative_links(bench / "README.md")
    }
    tables = [p for p in sorted(bench.iterdir()) if p.name != "README.md"]
    assert [p.name for p in tables if p not in linked] == []
