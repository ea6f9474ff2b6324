"""The README and docs/ stay true to the repository.

- Every `path.py:name` in the README's file map exists: the file, and the function or class (or
  `Class.method`) defined in it, read with `ast` (nothing is imported).
- No Markdown link or backticked repository path in README.md or docs/*.md points outside the
  repository or to a missing file, and nothing refers to the design document that lives outside.
- Code comments cite docs/ pages that exist, never the design document.
- The README stays short.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 200

# folders of the repository that backticked paths may name (outputs like shards/, runs/ are not)
SOURCE_DIRS = ("pipeline", "trainer", "tests", "docs", "configs", "bench", ".ci")
# absolute paths that are obviously examples of a user's data, not files of this repository
EXAMPLE_ROOTS = ("/data/",)
FORBIDDEN = ("design.md", "shared/design", "design §")

MAP_ENTRY = re.compile(r"`([\w./-]+\.py):([A-Za-z_][\w.]*)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def file_map_lines() -> list[str]:
    """The list items of the README's `## File map` section."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## File map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## File map' section"
    return [line for line in match.group(1).splitlines() if line.startswith("- ")]


@functools.cache
def _definitions(path: Path) -> dict[str, set[str]]:
    """Top-level function and class names of a module -> the methods each class defines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def _defined(path: Path, name: str) -> bool:
    parts = name.split(".")
    names = _definitions(path)
    if len(parts) == 1:
        return name in names
    return len(parts) == 2 and parts[1] in names.get(parts[0], set())


def test_file_map_lists_modules():
    lines = file_map_lines()
    assert len(lines) >= 20, "the file map should have one line per module"
    bare = [line for line in lines if not MAP_ENTRY.search(line)]
    assert not bare, f"file map lines without a `path.py:name`: {bare}"


def test_file_map_names_exist():
    missing = []
    for line in file_map_lines():
        for path, name in MAP_ENTRY.findall(line):
            file = REPO / path
            if not file.is_file():
                missing.append(f"{path} (no such file)")
            elif not _defined(file, name):
                missing.append(f"{path}:{name} (not defined there)")
    assert not missing, "README file map names what the code lacks:\n" + "\n".join(missing)


def test_file_map_says_where_the_key_jobs_are():
    text = "\n".join(file_map_lines())
    for entry in (
        "trainer/model/module.py:StereoT5.training_step",
        "trainer/model/heads/base.py:HeadOutput",
        "trainer/cli.py:RunCheckpoint",
        "trainer/model/weights.py:save_pretrained",
    ):
        assert f"`{entry}`" in text, f"the file map must name {entry}"


def _inside_repo(page: Path, target: str) -> Path | None:
    """The file a relative link or path names, or None when it leaves the repository."""
    resolved = (page.parent / target).resolve()
    return resolved if resolved.is_relative_to(REPO) else None


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_stay_inside_and_resolve(page):
    text = page.read_text(encoding="utf-8")
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: only the design doc is forbidden
            if any(word in target for word in FORBIDDEN):
                bad.append(f"{target} (the design document is not part of the repository)")
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/") or ".." in Path(path).parts:
            bad.append(f"{target} (points outside the repository)")
            continue
        file = _inside_repo(page, path) if path else page
        if file is None or not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not bad, f"{_rel(page)}: bad links:\n" + "\n".join(bad)


def _path_spans(text: str) -> list[str]:
    """Backticked tokens that look like paths: one word holding a slash."""
    return [span for span in CODE_SPAN.findall(text) if "/" in span and " " not in span]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_backticked_paths_exist(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    bad = []
    for span in _path_spans(text):
        path = span.split(":", 1)[0] if re.match(r"[\w./-]+\.py:", span) else span
        if path.startswith("/"):
            if not path.startswith(EXAMPLE_ROOTS):
                bad.append(f"{span} (an absolute path)")
            continue
        if ".." in Path(path).parts:
            bad.append(f"{span} (points outside the repository)")
            continue
        if path.split("/")[0] not in SOURCE_DIRS:
            continue  # not a path of this repository (shards/<name>, train/..., a URL)
        pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", path.rstrip("/"))
        if not any(REPO.glob(pattern)):
            bad.append(f"{span} (no such file)")
    assert not bad, f"{_rel(page)}: backticked paths that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_reference_to_the_outside_design_doc(page):
    text = page.read_text(encoding="utf-8")
    found = [word for word in FORBIDDEN if word in text]
    assert not found, f"{_rel(page)} refers to the design document ({found}): cite docs/ instead"
    assert "../" not in text, f"{_rel(page)} names a path outside the repository"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_code_cites_docs_not_the_design():
    """Comments point to docs/ (that exists), never to the design document outside the repo."""
    sources = [REPO / "justfile", *REPO.glob("configs/*.yaml")]
    for folder in ("pipeline", "trainer", "bench"):
        sources += sorted((REPO / folder).rglob("*.py"))
    bad = []
    for source in sources:
        text = source.read_text(encoding="utf-8")
        bad += [f"{_rel(source)}: cites '{word}'" for word in FORBIDDEN if word in text]
        for doc in sorted(set(re.findall(r"docs/[\w-]+\.md", text))):
            if not (REPO / doc).is_file():
                bad.append(f"{_rel(source)}: names {doc}, which does not exist")
    assert not bad, "code comments must cite docs/:\n" + "\n".join(bad)
