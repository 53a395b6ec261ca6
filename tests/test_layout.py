"""The shipped packages' import graph: no circle, and no import from a lower layer to a higher one.

Every import statement of every module of ``dualpipe_fx``, ``passes`` and ``titan_integration``
counts, nested (lazy) ones too. A package's ``__init__`` is a face that hands names on: ``from
pkg import name`` counts as an import of ``pkg.name`` when that is a module, and an import of a
package itself draws no edge (the same graph as the project's import-circle tool).

Layers, lowest first (a module may import its own layer and the ones below)::

    passes < {dualpipe_fx._compat, dualpipe_fx.schedules} < dualpipe_fx.planning
           < dualpipe_fx.runtime < dualpipe_fx.api < dualpipe_fx.ui < titan_integration

``dualpipe_fx.examples`` imports nothing of the project but ``dualpipe_fx._compat`` (and only the
ui and titan_integration import it); ``dualpipe_fx.ui.visualize`` imports planning and below only.
"""
from __future__ import annotations

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dualpipe_fx", "passes", "titan_integration")

# (prefix, rank): a module's layer is its longest matching prefix
LAYERS = (
    ("passes", 0),
    ("dualpipe_fx._compat", 1),
    ("dualpipe_fx.schedules", 1),
    ("dualpipe_fx.planning", 2),
    ("dualpipe_fx.runtime", 3),
    ("dualpipe_fx.api", 4),
    ("dualpipe_fx.examples", 4),  # below the ui; what it may import is restricted further below
    ("dualpipe_fx.ui", 5),
    ("titan_integration", 6),
)
# module prefix -> the project modules (prefixes) it may import at all
ONLY = {
    "dualpipe_fx.examples": ("dualpipe_fx._compat", "dualpipe_fx.examples"),
    "dualpipe_fx.ui.visualize": ("passes", "dualpipe_fx._compat", "dualpipe_fx.schedules", "dualpipe_fx.planning"),
}


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def _layer(mod: str):
    best = max((p for p, _ in LAYERS if _within(mod, p)), key=len, default=None)
    return dict(LAYERS)[best] if best else None


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    files = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mod = ".".join(path.relative_to(root).with_suffix("").parts)
            files[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return files


def imports(path: pathlib.Path, mod: str, known, packages) -> list[tuple[int, str, str]]:
    """``(line, imported module, the statement)`` for every project module ``mod`` imports."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, str(path))
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]

    def resolve(name: str) -> str:
        while name and name not in known:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [resolve(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.append(sub if sub in known else resolve(base))
        else:
            continue
        text = ast.get_source_segment(source, node) or ast.dump(node)
        out += [(node.lineno, t, text) for t in targets if t and t != mod and t not in packages]
    return out


@functools.lru_cache(maxsize=None)  # parsed once for the three tests
def graph(root: pathlib.Path):
    files = module_files(root)
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return files, {m: imports(p, m, files, packages) for m, p in files.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def layer_violations(root: pathlib.Path) -> list[str]:
    files, g = graph(root)
    bad = []
    for mod, edges in sorted(g.items()):
        mine = _layer(mod)
        only = next((v for k, v in ONLY.items() if _within(mod, k)), None)
        for line, target, text in edges:
            where = f"{files[mod].relative_to(root)}:{line}: {text!r}"
            theirs = _layer(target)
            if only is not None and not any(_within(target, p) for p in only):
                bad.append(f"{where}: {mod} may import only {', '.join(only)}, not {target}")
            elif mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{where}: {mod} (layer {mine}) imports the higher layer {target} (layer {theirs})")
            elif target.startswith("dualpipe_fx.examples") and not mod.startswith(("dualpipe_fx.examples",
                                                                                  "dualpipe_fx.ui",
                                                                                  "titan_integration")):
                bad.append(f"{where}: {mod} imports the examples; only the ui and titan_integration may")
    return bad


def test_every_module_has_a_layer():
    files, _ = graph(ROOT)
    assert [m for m in files if _layer(m) is None] == ["dualpipe_fx"], "a module outside every layer of LAYERS"


def test_no_import_circle():
    files, g = graph(ROOT)
    found = circles({m: {t for _, t, _ in e} for m, e in g.items()})
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = layer_violations(ROOT)
    assert not bad, "imports against the layers (" + str(len(bad)) + "):\n" + "\n".join(bad)
