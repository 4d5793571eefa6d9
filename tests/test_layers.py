"""The package's layers: every import points down.

:data:`LAYERS` lists the package's layers from the bottom up, one sentence each, and
the modules each holds (docs/architecture.md describes them). The tests read every
module of ``gspo_kernels`` with ``ast`` -- imports at module level, inside functions,
under ``if`` / ``try`` / ``TYPE_CHECKING`` alike: an import inside a function must not
hide a circle -- and fail on

- an import of a module in a higher layer (pointing up),
- an import of a module in the same layer, where that layer takes none (sideways),
- a circle of imports (within a layer that allows sideways imports),
- an integration reaching past the public API (a private module or name),
- a module that no layer lists (a new module declares its layer here), and a layer entry
  that matches no module (a stale row).

Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``; those implicit
parent imports are not edges: a package's ``__init__`` sits above its modules and the
package is always imported from the top. Nothing here imports the package.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gspo_kernels"


@dataclass(frozen=True)
class Layer:
    name: str
    summary: str
    modules: tuple[str, ...]  # dotted names; "pkg.sub.*" matches every module under pkg.sub
    sideways: bool = False  # may its modules import each other (without a circle)?
    public_only: bool = False  # may it import only public modules and names?


# Bottom up. A module may import any module of a lower layer, and of its own layer only
# where ``sideways`` says so.
LAYERS: tuple[Layer, ...] = (
    Layer(
        "errors",
        "The exception classes, one per kind of mistake; imports nothing of the package.",
        ("gspo_kernels.errors",),
    ),
    Layer(
        "kernels",
        "Triton kernels with their launch plans, and the chunked PyTorch path that stands in for "
        "them on a CPU without the interpreter; no autograd, no argument checks.",
        (
            "gspo_kernels._kernels",
            "gspo_kernels._kernels_linear",
            "gspo_kernels._kernels_seq",
            "gspo_kernels._launch_linear",
            "gspo_kernels._torch_path",
        ),
        sideways=True,
    ),
    Layer(
        "checks",
        "Argument checks: shapes, dtypes and devices raise at once; checks that read values queue "
        "on one device flag (ValueChecks) read once per call.",
        ("gspo_kernels._checks", "gspo_kernels._validate"),
        sideways=True,
    ),
    Layer(
        "ops",
        "The kernels as torch.library custom ops, the choice of backend (Triton or the PyTorch path) "
        "and the logits' backward shared by every autograd function.",
        ("gspo_kernels._ops",),
    ),
    Layer(
        "layouts",
        "Which tokens belong to which sequence (padded rows or packed cu_seqlens): masked means "
        "and sums, lengths, scatter and gather; knows nothing of log-probs.",
        ("gspo_kernels.sequences",),
    ),
    Layer(
        "collectives",
        "Vocab-parallel shards: the collectives over the ops' per-row statistics and their autograd function.",
        ("gspo_kernels.vocab_parallel",),
    ),
    Layer(
        "public ops",
        "The log-prob autograd functions and the public ops over logits and over hidden "
        "states; each independent of the other.",
        ("gspo_kernels.logprobs", "gspo_kernels.linear"),
    ),
    Layer(
        "loss options and inputs",
        "What a loss call asks for (LossOptions, checked once, every family's "
        "options) and its inputs resolved: checked, laid out (N, T), one "
        "log-prob pass.",
        ("gspo_kernels.losses.options", "gspo_kernels.losses.inputs", "gspo_kernels.losses.verl_config"),
        sideways=True,
    ),
    Layer(
        "loss parts",
        "Per-token math in PyTorch: objectives, KL, masks, aggregation, advantages, metrics, "
        "and each loss family's own parts (verl's), registered in tables the core reads.",
        (
            "gspo_kernels.losses.objectives",
            "gspo_kernels.losses.masks",
            "gspo_kernels.losses.aggregate",
            "gspo_kernels.losses.advantages",
            "gspo_kernels.losses.metrics",
            "gspo_kernels.losses.verl",
        ),
        sideways=True,
    ),
    Layer(
        "fused tail",
        "The TRL family's loss tail as Triton kernels: device math, in-kernel checks, "
        "kernels, launch plan, autograd function; equal to the loss parts it replaces.",
        ("gspo_kernels.losses.tail", "gspo_kernels.losses.tail.*"),
        sideways=True,
    ),
    Layer(
        "loss composition",
        "The composition (fused tail or torch parts, by family), the presets and the nn.Modules.",
        ("gspo_kernels.losses.core", "gspo_kernels.losses"),
        sideways=True,
    ),
    Layer("package", "The public API: the names a user imports from gspo_kernels.", ("gspo_kernels",)),
    Layer(
        "integrations",
        "Trainer adapters (TRL, verl) on the public API only.",
        ("gspo_kernels.integrations", "gspo_kernels.integrations.*"),
        public_only=True,
    ),
)


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    names: tuple[str, ...]  # the names taken (from-imports), else ()
    line: int
    in_function: bool


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def _resolve(node: ast.ImportFrom, importer: str, mods: dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if _is_package(importer, mods) else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges(mods: dict[str, Path]) -> list[Edge]:
    """Every import of a package module by a package module, wherever it sits in the file."""
    out = []
    for importer, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        inner = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for n in ast.walk(f)
            if n is not f
        }
        for node in ast.walk(tree):
            found: list[tuple[str, tuple[str, ...]]] = []
            if isinstance(node, ast.Import):
                found = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, importer, mods)
                plain = []
                for a in node.names:  # ``from pkg import submodule`` imports the submodule
                    sub = f"{target}.{a.name}"
                    if sub in mods:
                        found.append((sub, ()))
                    else:
                        plain.append(a.name)
                if plain or not node.names:
                    found.append((target, tuple(plain)))
            for name, taken in found:
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    while name not in mods and "." in name:  # ``import a.b.c`` of a name inside a module
                        name = name.rsplit(".", 1)[0]
                    out.append(Edge(importer, name, taken, node.lineno, id(node) in inner))
    return out


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == pat or fnmatch.fnmatchcase(module, pat) for pat in layer.modules):
            return i
    return None


def _where(i: int) -> str:
    return f"layer {i} '{LAYERS[i].name}'"


def _edge(e: Edge) -> str:
    how = "inside a function" if e.in_function else "at module level"
    return f"{e.importer} imports {e.imported} (line {e.line}, {how})"


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, edges(mods)


def test_every_module_has_a_layer(graph):
    mods, _ = graph
    missing = sorted(m for m in mods if layer_of(m) is None)
    assert not missing, (
        f"modules in no layer: {missing}; add each to the layer it belongs to in "
        "tests/test_layers.py's LAYERS (and to docs/architecture.md)"
    )


def test_every_layer_entry_matches_a_module(graph):
    mods, _ = graph
    stale = [
        (layer.name, pat)
        for layer in LAYERS
        for pat in layer.modules
        if not any(m == pat or fnmatch.fnmatchcase(m, pat) for m in mods)
    ]
    assert not stale, f"layer entries that match no module (renamed or removed?): {stale}"


def test_imports_point_down(graph):
    _, found = graph
    bad = []
    for e in found:
        a, b = layer_of(e.importer), layer_of(e.imported)
        if a is None or b is None or e.importer == e.imported:
            continue  # reported by test_every_module_has_a_layer
        if b > a:
            bad.append(f"{_edge(e)}: {_where(a)} imports up into {_where(b)}")
        elif b == a and not LAYERS[a].sideways:
            bad.append(f"{_edge(e)}: both in {_where(a)}, whose modules do not import each other")
    assert not bad, "imports that do not point down:\n  " + "\n  ".join(bad)


def circles(mods: dict[str, Path], found: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    succ: dict[str, set[str]] = {m: set() for m in mods}
    for e in found:
        if e.importer != e.imported:
            succ[e.importer].add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return out


def test_no_circle(graph):
    mods, found = graph
    found_circles = circles(mods, found)
    detail = [
        f"{c}: " + "; ".join(_edge(e) for e in found if e.importer in c and e.imported in c) for c in found_circles
    ]
    assert not found_circles, "circles of imports:\n  " + "\n  ".join(detail)


def _private(dotted: str) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in dotted.split("."))


def test_integrations_use_the_public_api(graph):
    mods, found = graph
    bad = []
    for e in found:
        a = layer_of(e.importer)
        if a is None or not LAYERS[a].public_only:
            continue
        if _private(e.imported):
            bad.append(f"{_edge(e)}: a private module")
        bad += [f"{_edge(e)}: the private name {n!r}" for n in e.names if _private(n)]
    for name, path in mods.items():  # gspo_kernels._private reached as an attribute
        a = layer_of(name)
        if a is None or not LAYERS[a].public_only:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == PACKAGE
                and _private(node.attr)
            ):
                bad.append(f"{name} reads {PACKAGE}.{node.attr} (line {node.lineno}): a private attribute")
    assert not bad, "integrations reach past the public API:\n  " + "\n  ".join(bad)


def test_no_import_by_name(graph):
    """``importlib.import_module`` / ``__import__`` of a package module would escape the checks above."""
    mods, _ = graph
    bad = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if called in ("import_module", "__import__") and any(
                    isinstance(a, ast.Constant) and str(a.value).startswith(("gspo_kernels", ".")) for a in node.args
                ):
                    bad.append(f"{name} line {node.lineno}")
    assert not bad, f"package modules imported by name: {bad}"


def test_the_checks_see_what_they_check(tmp_path):
    """The reader resolves relative, submodule and function-level imports, and finds a circle that a
    function-level import closes (a synthetic package)."""
    src = {
        "__init__.py": "from .b import f\n",
        "a.py": "X = 1\n",
        "b.py": "from . import a\n\ndef f():\n    from .sub.c import g\n    return g\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import X\nimport gspo_kernels.b\n\ndef g():\n    return X\n",
    }
    for rel, text in src.items():
        p = tmp_path / PACKAGE / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    mods = modules(tmp_path)
    found = edges(mods)
    got = {(e.importer, e.imported, e.in_function) for e in found}
    assert got == {
        ("gspo_kernels", "gspo_kernels.b", False),
        ("gspo_kernels.b", "gspo_kernels.a", False),
        ("gspo_kernels.b", "gspo_kernels.sub.c", True),
        ("gspo_kernels.sub.c", "gspo_kernels.a", False),
        ("gspo_kernels.sub.c", "gspo_kernels.b", False),
    }, got
    assert circles(mods, found) == [["gspo_kernels.b", "gspo_kernels.sub.c"]]
