"""Print the import graph of the project's own modules, and what runs against the layering.

    python scripts/import_graph.py            # one line per module: its module-level imports
    python scripts/import_graph.py --lazy     # imports inside functions too (marked "lazy")
    python scripts/import_graph.py --check    # only the problems; exit 1 if there are any
    python scripts/import_graph.py --rev e9563d1   # the graph of an earlier commit (read through git)

Reads the source with ``ast`` (nothing is imported). An edge A -> B means A imports B (or a name from
B). "Module level" is what runs when A is imported; "lazy" imports run only when a function is called.
Problems reported: cycles among module-level imports, a top-level package other than ``rf_runtime``,
the torch-free runtime path (streamer, bundle, snapshot, the numpy backends and runners) importing
torch at module level or reaching into the torch packages (``models``) at all, and upward arrows:
a generic module importing (even lazily) the layers that sit on top (``world``, ``train``, export).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("rf_runtime", "export")  # "export" only exists in trees before the renovation
# modules that a product team imports with numpy + onnxruntime only (DESIGN: the runtime path)
RUNTIME = (
    "rf_runtime",
    "rf_runtime.streamer",
    "rf_runtime.bundle",
    "rf_runtime.memory",
    "rf_runtime.snapshot",
    "rf_runtime.cache",
    "rf_runtime.sampler",
    "rf_runtime.backends.base",
    "rf_runtime.backends.engine",
    "rf_runtime.backends.select",
    "rf_runtime.runners.base",
    "rf_runtime.runners.onnxruntime_runner",
    "rf_runtime.text.hashed",
    "rf_runtime.text.umt5_onnx",
    "rf_runtime.engine_backend",
    "rf_runtime.backend",
    "rf_runtime.text_onnx",
)


# the layers on top: only they (and the CLIs / test helpers, which sit above everything) may import them
TOP = ("rf_runtime.world", "rf_runtime.train", "rf_runtime.export", "export", "rf_runtime.serve")
ABOVE_ALL = ("rf_runtime.cli", "rf_runtime.testing", "rf_runtime.bench")


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


_REV = None  # a git revision to read instead of the working tree


def _read(path: str) -> str:
    if _REV is None:
        with open(path) as f:
            return f.read()
    rel = os.path.relpath(path, ROOT)
    return subprocess.run(
        ["git", "-C", ROOT, "show", f"{_REV}:{rel}"], check=True, capture_output=True, text=True
    ).stdout


def modules() -> dict[str, str]:
    found = {}
    if _REV is not None:
        listing = subprocess.run(
            ["git", "-C", ROOT, "ls-tree", "-r", "--name-only", _REV],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for rel in sorted(listing):
            parts = rel[:-3].split("/")
            if rel.endswith(".py") and parts[0] in PACKAGES:
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(ROOT, rel)
        return found
    for package in PACKAGES:
        base = os.path.join(ROOT, package)
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    found[".".join(rel)] = os.path.join(folder, name)
    return found


def edges(name: str, path: str, known: dict[str, str]) -> list[tuple[str, bool]]:
    """(imported module, lazy) pairs of one module; only the project's modules and torch."""
    tree = ast.parse(_read(path), path)
    is_package = path.endswith("__init__.py")
    out = []

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in known or candidate == "torch":
                return candidate
            parts.pop()
        return None

    def visit(node, lazy: bool):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    hit = resolve(alias.name)
                    if hit:
                        out.append((hit, lazy))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    hit = resolve(f"{module}.{alias.name}") or resolve(module)
                    if hit:
                        out.append((hit, lazy))
            visit(child, inner)

    visit(tree, False)
    seen, unique = set(), []
    for target, lazy in out:
        if target != name and (target, lazy) not in seen:
            seen.add((target, lazy))
            unique.append((target, lazy))
    return unique


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def walk(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lazy", action="store_true", help="also list imports made inside functions")
    p.add_argument("--check", action="store_true", help="print only the problems; exit 1 if any")
    p.add_argument("--rev", help="read the tree of this git revision instead of the working tree")
    args = p.parse_args(argv)
    global _REV
    _REV = args.rev
    known = modules()
    graph, lazy_graph = {}, {}
    for name, path in known.items():
        es = edges(name, path, known)
        graph[name] = {t for t, lazy in es if not lazy}
        lazy_graph[name] = {t for t, lazy in es if lazy} - graph[name]
    problems = []
    for cycle in cycles(graph):
        problems.append("cycle: " + " -> ".join(cycle))
    tops = sorted({n.split(".")[0] for n in known} - {"rf_runtime"})
    for top in tops:
        problems.append(f"top-level package {top!r} besides rf_runtime (installs as a generic name)")
    for name in RUNTIME:
        if name in graph and "torch" in graph[name]:
            problems.append(f"runtime module {name} imports torch at module level")
        for target in sorted(graph.get(name, set()) | lazy_graph.get(name, set())):
            if _under(target, ("rf_runtime.models",)):
                problems.append(f"runtime module {name} reaches into the torch package: {target}")
    for name in sorted(known):
        if _under(name, TOP) or _under(name, ABOVE_ALL):
            continue
        for target in sorted(graph[name] | lazy_graph[name]):
            if _under(target, TOP):
                problems.append(f"upward import: {name} -> {target}")
    if not args.check:
        for name in sorted(known):
            line = ", ".join(sorted(graph[name] - {"torch"}))
            torch_mark = " [torch]" if "torch" in graph[name] else ""
            print(f"{name}{torch_mark}: {line}")
            if args.lazy and lazy_graph[name]:
                print(f"    lazy: {', '.join(sorted(lazy_graph[name]))}")
        edges_total = sum(len(v - {"torch"}) for v in graph.values())
        print(f"\n{len(known)} modules, {edges_total} module-level edges")
    for line in problems:
        print(line)
    if not problems and args.check:
        print(
            "import graph: no cycles, one top-level package, no torch on the runtime path, no upward imports"
        )
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
