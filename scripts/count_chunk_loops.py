"""Count the places that write the streaming chunk recipe (denoise, then commit to the cache).

    python scripts/count_chunk_loops.py

Reads the source with ``ast``. A function is listed when it calls a denoising primitive
(``denoise_step``, ``denoise``, ``forward_chunk``, ``predict``) and also ``cache_pass`` (it runs one
chunk's recipe itself), or when a ``for`` loop in it calls ``cache_pass`` or ``step`` on a rollout (a variable named ``roll*``)
(it loops over chunks itself); a loop that only re-commits kept chunks (the prompt switch's
re-cache, ``stored_latents``) generates nothing and is not counted. The backends' implementations of the primitives (``def cache_pass``,
``def denoise_step``) do neither and are not listed. Prints each place as file:line function, marked
"torch" for the PyTorch code and "runtime" for the streamer, which runs the recipe over the
``Backend`` interface (numpy; any backend, the PyTorch one included).
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENOISE = {"denoise_step", "denoise", "forward_chunk", "predict"}


def calls(node) -> set[str]:
    """Names called in ``node``; a rollout's ``step`` is "rollout.step" (a Stream consumer's own
    ``step``, e.g. rf-serve's engine, is not a chunk recipe)."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == "step" and "roll" not in getattr(getattr(f, "value", None), "id", ""):
                continue
            out.add("rollout.step" if name == "step" else name)
    return out


def places(path: str):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        own = [n for n in ast.walk(node) if n is not node and isinstance(n, (ast.FunctionDef, ast.Lambda))]
        inner = {id(x) for n in own for x in ast.walk(n)}
        body_calls = set()
        loops = []
        for sub in ast.walk(node):
            if id(sub) in inner:
                continue
            if isinstance(sub, ast.Call):
                f = sub.func
                body_calls.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
            if isinstance(sub, (ast.For, ast.While)):
                loops.append(sub)
        recipe = bool(body_calls & DENOISE) and "cache_pass" in body_calls
        # a loop that re-commits kept chunks (a prompt switch's re-cache) generates nothing: not counted
        loop = any(
            {"cache_pass", "rollout.step"} & calls(lp) and "stored_latents" not in calls(lp) for lp in loops
        )
        if recipe or loop:
            yield node.lineno, node.name, "recipe" if recipe else "loop over chunks"


def main() -> int:
    found = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, "rf_runtime")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)
                for line, func, why in places(path):
                    side = "runtime" if rel.endswith("streamer.py") else "torch"
                    found.append((rel, line, func, why, side))
    for rel, line, func, why, side in found:
        print(f"{rel}:{line} {func} ({why}; {side})")
    torch_count = sum(1 for f in found if f[4] == "torch")
    print(f"\n{torch_count} in PyTorch, {len(found) - torch_count} in the runtime streamer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
