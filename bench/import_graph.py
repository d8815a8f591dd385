"""The import graph between the project's modules, checked for cycles and upward arrows.

    python bench/import_graph.py            # the check: exit 1 on a cycle or an upward arrow
    python bench/import_graph.py --edges    # also every arrow (module -> module it imports)
    python bench/import_graph.py --rooms    # the graph folded to packages, as docs/architecture.md draws it

Every `import` / `from ... import` of `deeplab_core` and `pipelines` is read with `ast`, at module
level and inside functions alike (a lazy import is still an arrow). Floors, lowest first: an arrow
may point to the same floor or down, never up:

    0 deeplab_core            pure PyTorch + NumPy
    1 pipelines.common        errors, redaction, URIs, config, console, CLI skeleton, Ray session
    2 pipelines.data          storage, manifests, importers, decoding, checkpoints
    3 pipelines.tracking      every MLflow call
    4 pipelines.segmentation, pipelines.training, pipelines.promotion   the jobs
    5 pipelines/*.py          entry scripts (and the demo)
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deeplab_core", "pipelines")
FLOORS = (("deeplab_core", 0), ("pipelines.common", 1), ("pipelines.data", 2), ("pipelines.tracking", 3),
          ("pipelines.segmentation", 4), ("pipelines.training", 4), ("pipelines.promotion", 4))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    for prefix, level in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    return 5  # pipelines.<script>


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" and len(parts) > 2 else (
        parts[0] if parts[0] == "deeplab_core" else module)


def resolve(target: str, modules: set[str]) -> str | None:
    """The longest known module `target` names (`from a.b import c` may name module a.b.c)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for target in targets:
                found = resolve(target, known)
                if found and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", action="store_true", help="print every module -> module arrow")
    parser.add_argument("--rooms", action="store_true", help="print the graph folded to packages")
    args = parser.parse_args()
    modules = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
    graph = edges(modules)
    upward = sorted((a, b) for a, targets in graph.items() for b in targets if floor(b) > floor(a))
    found = cycles(graph)
    if args.edges:
        for a in sorted(graph):
            print(f"{a} -> {', '.join(sorted(graph[a]))}")
    if args.rooms:
        folded: dict[str, set[str]] = defaultdict(set)
        for a, targets in graph.items():
            for b in targets:
                if room(a) != room(b):
                    folded[room(a)].add(room(b))
        for a in sorted(folded, key=lambda r: (-floor(r), r)):
            print(f"[{floor(a)}] {a} -> {', '.join(sorted(folded[a], key=lambda r: (-floor(r), r)))}")
    largest = max(modules.values(), key=lambda p: len(p.read_text().splitlines()))
    print(f"{len(modules)} modules, {sum(len(t) for t in graph.values())} arrows; "
          f"cycles: {len(found)}; upward arrows: {len(upward)}; largest file: "
          f"{largest.relative_to(ROOT)} ({len(largest.read_text().splitlines())} lines)")
    for component in found:
        print("cycle: " + " <-> ".join(component))
    for a, b in upward:
        print(f"upward: {a} (floor {floor(a)}) -> {b} (floor {floor(b)})")
    return 1 if found or upward else 0


if __name__ == "__main__":
    sys.exit(main())
