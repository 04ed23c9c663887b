"""The docs are for readers: no build machine's absolute paths, a short README, links that resolve,
and README Python that runs.

The README's ```python blocks run in order, in one namespace (as a reader would type them), each in
a fresh temporary working directory. A block whose first line is ``# needs CUDA`` runs only where a
GPU is present; one whose first line is ``# slow: ...`` (a long torch.compile) is skipped unless
``FASTDDPM_DOCS_SLOW=1``. Keep the other blocks cheap: they run in ``pytest -q`` on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".md", ".json", ".txt", ".py", ".sh"}
README_MAX_LINES = 200

# Absolute paths of a build machine: a path that starts one of these folders (not preceded by a
# word character, a dot or another path piece, so relative paths such as docs/work/ and URLs pass),
# an installed package's folder, or a Windows drive.
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:root|home|work|tmp|opt|usr/local)/|site-packages[/\\]|(?<!\w)[A-Za-z]:\\")


def _doc_files() -> List[Path]:
    files = [README] + sorted(p for p in DOCS.rglob("*") if p.is_file())
    return files


def _text_files() -> List[Path]:
    out = []
    for p in _doc_files():
        if p.suffix.lower() not in TEXT_SUFFIXES:
            continue
        data = p.read_bytes()
        if b"\0" in data:  # binary after all
            continue
        out.append(p)
    return out


def _markdown_files() -> List[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------- (a) machine paths
def test_no_absolute_paths_of_a_build_machine():
    found = []
    for p in _text_files():
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            m = MACHINE_PATH.search(line)
            if m:
                found.append(f"{_rel(p)}:{n}: {m.group(0)!r} in {line.strip()[:120]!r}")
    assert not found, "absolute paths of a build machine in the docs:\n" + "\n".join(found)


def test_the_machine_path_pattern():
    for bad in ["see /root/out/bench.json", "`/work/main/csrc/ops.cpp`", "(/tmp/x)", "PATH=/opt/torch/bin",
                "lib/python3.12/site-packages/torch", r"C:\Users\me", "/usr/local/cuda/bin/nvcc", "/home/me/x"]:
        assert MACHINE_PATH.search(bad), bad
    for fine in ["docs/bench/cpu-zen3-avx2/bench.md", "runs/digits", "https://example.org/opt/x",
                 "a docs/work/ folder", "../performance.md", "5/10 steps", "nvidia/cu13/include"]:
        assert not MACHINE_PATH.search(fine), fine


def test_every_json_file_in_docs_parses():
    for p in DOCS.rglob("*.json"):
        json.loads(p.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- (b) README length
def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; keep it under {README_MAX_LINES} (details go to docs/)"


def test_readme_keeps_the_ci_test_command():
    assert 'python3 -m venv .venv && . .venv/bin/activate && pip install ".[test]" && pytest -q' in \
        README.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- (c) links
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def _prose_lines(text: str, keep_code: bool = False) -> List[Tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code removed unless ``keep_code``."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line if keep_code else INLINE_CODE.sub("", line)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set:
    anchors, seen = set(), {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8"), keep_code=True):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            anchors.add(slug if k == 0 else f"{slug}-{k}")
    return anchors


def _links(path: Path) -> List[Tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(n, m.group(1)) for n, line in _prose_lines(text) for m in LINK.finditer(line)]


def _check_link(src: Path, target: str) -> Optional[str]:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    if target.startswith("/"):
        return "absolute link (use a path relative to this file)"
    path_part, _, fragment = target.partition("#")
    dest = src if not path_part else (src.parent / path_part).resolve()
    if ROOT not in dest.parents and dest != ROOT:
        return "points outside the repository"
    if not dest.exists():
        return "no such file"
    if fragment and dest.suffix == ".md" and fragment.lower() not in _anchors(dest):
        return f"no heading #{fragment} in {_rel(dest)}"
    return None


@pytest.mark.parametrize("path", _markdown_files(), ids=_rel)
def test_relative_links_and_images_resolve(path):
    broken = []
    for n, target in _links(path):
        why = _check_link(path, target)
        if why:
            broken.append(f"{_rel(path)}:{n}: ({target}): {why}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_the_docs():
    targets = {t.partition("#")[0] for _, t in _links(README)}
    for page in ("docs/design.md", "docs/performance.md", "docs/gpu.md", "docs/mnist_samples.png"):
        assert page in targets, f"README.md does not link {page}"


# ----------------------------------------------------------------------------- (d) README Python
def _python_blocks() -> List[Tuple[int, str]]:
    """(first line number, code) of every ```python block of the README."""
    blocks, cur, start = [], None, 0
    for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if cur is None and re.match(r"^```\s*python\s*$", stripped):
            cur, start = [], n + 1
        elif cur is not None and stripped.startswith("```"):
            blocks.append((start, "\n".join(cur) + "\n"))
            cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


BLOCKS = _python_blocks()


def _marker(code: str) -> Optional[str]:
    """'cuda' or 'slow' for a block whose first line marks it so, else None."""
    lines = code.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if re.match(r"^#\s*needs CUDA\b", first, re.IGNORECASE):
        return "cuda"
    if re.match(r"^#\s*slow:", first, re.IGNORECASE):
        return "slow"
    return None


def _skip_reason(code: str) -> Optional[str]:
    marker = _marker(code)
    if marker == "cuda":
        import torch

        return None if torch.cuda.is_available() else "marked '# needs CUDA' and there is no GPU here"
    if marker == "slow" and os.environ.get("FASTDDPM_DOCS_SLOW") != "1":
        return "marked '# slow: ...' (a long torch.compile); FASTDDPM_DOCS_SLOW=1 runs it"
    return None


def test_the_readme_has_python_that_runs_everywhere():
    assert BLOCKS, "README.md has no python blocks"
    assert any(_marker(code) is None for _, code in BLOCKS), "every README python block is marked to skip"


class _Session:
    """The README's namespace, shared by its blocks, and which blocks have run."""

    def __init__(self):
        self.namespace: Dict = {"__name__": "__readme__"}
        self.ran: set = set()
        self.failed: set = set()


@pytest.fixture(scope="module")
def readme_session() -> _Session:
    return _Session()


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(index, readme_session, tmp_path, monkeypatch):
    line, code = BLOCKS[index]
    reason = _skip_reason(code)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    # a block continues the ones above it (as a reader types them): run any not yet run first
    for i in range(index + 1):
        if i in readme_session.failed:
            pytest.fail(f"the block at README.md:{BLOCKS[i][0]}, which this one continues, failed")
        if i in readme_session.ran or _skip_reason(BLOCKS[i][1]):
            continue
        start, src = BLOCKS[i]
        try:
            exec(compile(src, f"README.md:{start}", "exec"), readme_session.namespace)
        except BaseException:
            readme_session.failed.add(i)
            raise
        readme_session.ran.add(i)
