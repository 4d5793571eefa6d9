"""Every ```python block of README.md and docs/*.md runs as pasted.

Each page is one session, the way doctest runs a file: its ```python blocks run
top to bottom, in order, with ``exec`` in one fresh namespace that holds nothing
(no name predefined, no import done for them), and their text runs exactly as
written (nothing is replaced). A block therefore imports and defines everything
it uses, or takes it from an earlier block of the same page. Every docs/*.md is
picked up by itself: a new page is tested without touching this file.

A block may be preceded (on the line right above its fence) by an HTML comment
that the page's reader sees in the source and this test reads:

- ``<!-- requires: cuda -->``: the block needs a CUDA device. It is compiled
  everywhere and run where CUDA exists; elsewhere it is listed in a warning.
- ``<!-- distributed: ... -->``: the block runs in a torch.distributed job; as
  written it creates what it needs (e.g. a world-size-1 gloo group) and runs
  here. The test checks that no process group exists before the page and that
  the page destroys the groups it made.

Any other marker of that form fails (a misspelt marker must not skip a block),
and so does a fence that names Python another way (```py, ```python3, ...):
such a block would not be run. The session runs in a temporary working
directory (blocks may write, e.g. a trainer's output directory). The Triton
kernels run in the CPU interpreter when there is no GPU (tests/conftest.py);
every shape in the docs is tiny. Pages that take more than a few seconds here
are ``slow`` (the full suite runs them); README.md's quick start is in the
quick tier.

Beside the blocks, docs/losses.md's "Every option" table is checked against
``LossOptions``: every field listed, with the default the code has.
"""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
import torch

import gspo_kernels

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# pages whose session runs in a few seconds on a 2-core CPU (interpreter kernels), imports aside: the
# quick tier. Any other page (a new one included) is slow until measured and listed here.
QUICK = {"README.md", "architecture.md", "edges.md", "losses.md", "layouts.md", "verl.md"}
MARKERS = {"requires": {"cuda"}, "distributed": None}  # None: any value (a description of the job)

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
MARKER = re.compile(r"<!--\s*([a-z_-]+)\s*:\s*(.*?)\s*-->\s*\Z")
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "pytho", "{python}", "python-repl"}


def blocks(path: Path):
    """``(line, info, source, markers)`` of every fenced block of ``path``, in order; ``line`` is the
    1-based line of the block's first source line, ``markers`` the HTML-comment marker right above it."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.search(before)
        markers = {marker.group(1): marker.group(2)} if marker else {}
        line = text.count("\n", 0, m.start("body")) + 1
        out.append((line, m.group("info").strip(), m.group("body"), markers))
    return out


def python_blocks(path: Path):
    return [b for b in blocks(path) if b[1] == "python"]


def _param(path: Path):
    marks = [] if path.name in QUICK else [pytest.mark.slow]
    return pytest.param(path, id=path.name, marks=marks)


def test_pages_found():
    assert (ROOT / "README.md") in PAGES and len(PAGES) >= 2, PAGES
    assert python_blocks(ROOT / "README.md"), "README.md has no ```python block"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in PAGES])
def test_every_python_block_is_one_the_test_runs(path):
    """No block escapes the session: Python is fenced as ```python (nothing else), and every
    marker above a python block is one this test knows."""
    for line, info, _, markers in blocks(path):
        lang = info.split()[0].lower() if info else ""
        assert lang not in PYTHON_ALIASES and not (lang == "python" and info != "python"), (
            f"{path.name}:{line}: a Python block fenced as ```{info}: fence it as ```python so that it runs"
        )
        for key, value in markers.items():
            assert key in MARKERS, f"{path.name}:{line}: unknown marker {key!r}; known: {sorted(MARKERS)}"
            assert MARKERS[key] is None or value in MARKERS[key], (
                f"{path.name}:{line}: marker {key}: {value!r}; known values: {sorted(MARKERS[key])}"
            )
            assert info == "python", f"{path.name}:{line}: a marker above a ```{info} block, which is never run"


@pytest.mark.parametrize("path", [_param(p) for p in PAGES])
def test_page_runs_as_one_session(path, tmp_path, monkeypatch):
    pytest.importorskip("trl")  # the docs use TRL's GRPOConfig and transformers' models: the [trl] extra
    import torch.distributed as dist

    todo = python_blocks(path)
    if not todo:
        pytest.skip(f"{path.name} has no python block")
    assert not (dist.is_available() and dist.is_initialized()), "a process group exists before the page runs"
    monkeypatch.chdir(tmp_path)
    namespace = types.ModuleType(f"docs_{path.stem}").__dict__  # fresh: only __name__ and __doc__
    ran, not_run = 0, []
    try:
        for line, _, src, markers in todo:
            code = compile("\n" * (line - 1) + src, str(path), "exec")  # the page's own line numbers
            if markers.get("requires") == "cuda" and not torch.cuda.is_available():
                not_run.append(f"{path.name}:{line}")
                continue
            exec(code, namespace)  # noqa: S102 (running the docs is the point)
            ran += 1
    finally:
        left = dist.is_available() and dist.is_initialized()
        if left:
            dist.destroy_process_group()
    assert not left, f"{path.name} left a torch.distributed process group behind: destroy it at the end"
    assert ran + len(not_run) == len(todo)
    if not_run:
        warnings.warn(f"{path.name}: blocks marked 'requires: cuda' not run without a GPU: {not_run}", stacklevel=2)
    # what the blocks leave behind is what they promise: a finite loss
    loss = namespace.get("loss")
    if isinstance(loss, torch.Tensor):
        assert torch.isfinite(loss).all(), loss


def test_option_table_lists_every_option_with_its_default():
    """docs/losses.md's "Every option" table: one row per LossOptions field (several per row
    allowed), its default as the code has it."""
    import dataclasses

    text = (ROOT / "docs" / "losses.md").read_text()
    section = text[text.index("## Every option") :]
    section = section[: section.index("\n\n", section.index("| option |"))]
    documented = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        defaults = re.findall(r"`([^`]+)`", cells[1])[: len(names)]
        documented.update(zip(names, defaults))
    for field in dataclasses.fields(gspo_kernels.LossOptions):
        want = f'"{field.default}"' if isinstance(field.default, str) else str(field.default)
        assert documented.get(field.name) == want, (field.name, documented.get(field.name), want)
    assert set(documented) == {f.name for f in dataclasses.fields(gspo_kernels.LossOptions)}
