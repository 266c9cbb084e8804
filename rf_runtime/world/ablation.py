"""The paper's ablation on the world model: cache variants (no sink, static sink, EMA-Sink at several
alpha) and, given several students (e.g. DMD and Re-DMD at several beta), the same metrics per model.

Every run streams ``seconds`` of video per prompt and seed through the PyTorch reference model
with the variant's ``StreamSettings`` (inference only: the cache is a runtime choice), then scores
it with ``rf_runtime.eval``. Results: one row per run, aggregated per (model, variant).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np

from rf_runtime.errors import ConfigError
from rf_runtime.world.adherence import evaluate
from rf_runtime.sampler import StreamSettings

logger = logging.getLogger("rf_runtime")

CACHE_VARIANTS: dict[str, dict] = {
    "no sink": {"sink_frames": 0},
    "static sink": {"ema_alpha": 1.0},
    "EMA-Sink a=0.999": {"ema_alpha": 0.999},
    "EMA-Sink a=0.99": {"ema_alpha": 0.99},
    "EMA-Sink a=0.9": {"ema_alpha": 0.9},
}
DEFAULT_PROMPTS = (
    "a red circle bouncing",
    "a small blue square moving left on a gray background",
    "a big yellow triangle moving down quickly",
)
EVAL_METRICS = (
    "dynamic_degree",
    "flow_score",
    "travel",
    "drift",
    "quality_drift",
    "subject_consistency",
    "prompt_adherence",
)
FOLLOW_METRICS = ("colour", "background", "shape", "one_object", "motion_ok")
"""The prompt-following checks of ``rf_runtime.world.follow``, as percent of frames (motion: 100 when the
stream moves along its prompted axis, else 0)."""
METRICS = EVAL_METRICS + FOLLOW_METRICS


def run_metrics(result) -> dict:
    """An ``EvalResult``'s ablation metrics: its own fields, then the follow checks in percent (None for a
    prompt that is not the world's)."""
    metrics = {m: getattr(result, m) for m in EVAL_METRICS}
    follow = result.prompt_following.get("follow") or {}
    for m in FOLLOW_METRICS:
        metrics[m] = 100.0 * float(follow[m]) if m in follow else None
    return metrics


def detectable(se: float | None) -> float | None:
    """The smallest true difference that a paired test with this standard error finds with 80 % power at
    a two-sided 5 % level: (1.96 + 0.84) x se (normal approximation)."""
    return None if se is None else 2.8 * se


@dataclass
class Run:
    model: str
    variant: str
    prompt: str
    seed: int
    metrics: dict
    per_segment_flow: list
    seconds_to_generate: float


def settings_for(path: str, overrides: dict) -> StreamSettings:
    from rf_runtime import model_dir

    return model_dir.stream_settings(model_dir.read_card(path), **overrides)


RUNTIME_OVERRIDES = frozenset({"ema_alpha"})
"""Variant settings an engine bundle takes at load (its graphs' shapes stay): the EMA-Sink rate."""


def _streamer(model, overrides: dict, engine: str | None):
    from rf_runtime.streamer import Streamer

    if engine is not None and set(overrides) <= RUNTIME_OVERRIDES:
        return Streamer.from_engine(engine, threads=1, ema_alpha=overrides.get("ema_alpha"))
    model_dir, checkpoint = model if isinstance(model, tuple) else (model, None)
    return Streamer.from_checkpoint(model_dir, checkpoint, settings=settings_for(model_dir, overrides))


def run_one(model, overrides: dict, prompt: str, seed: int, seconds: float, engine: str | None = None):
    """Stream one video with the variant's settings and evaluate it -> (EvalResult, generation seconds).
    model: a model directory, or (model directory, generator checkpoint). engine: a bundle exported from
    that model: variants that change only the EMA-Sink rate stream through it (onnxruntime, one thread;
    the same frames to within a level of uint8, several times faster), the others (e.g. no sink, which
    changes the cache's size) through the model directory."""
    import time

    streamer = _streamer(model, overrides, engine)
    start = time.perf_counter()
    frames = np.concatenate(
        list(streamer.stream(prompt, seed=seed, num_frames=round(seconds * streamer.fps)))
    )
    elapsed = time.perf_counter() - start
    return evaluate(frames, prompt, fps=streamer.fps), elapsed


def _run_one_in_worker(model, overrides: dict, prompt: str, seed: int, seconds: float, engine=None):
    import torch

    torch.set_num_threads(1)  # one core per worker process
    return run_one(model, overrides, prompt, seed, seconds, engine)


def run_ablation(
    models: dict,
    variants: dict[str, dict],
    prompts,
    seeds,
    seconds: float,
    on_run=None,
    jobs: int = 1,
    engines: dict | None = None,
    reuse: list[Run] | None = None,
) -> list[Run]:
    """Every model x variant x prompt x seed. ``models``: name -> model directory or (directory, checkpoint).
    engines: name -> a bundle exported from that model, for the variants it can run (``run_one``).
    reuse: runs made earlier of the same models and stream length (``read_runs``); a cell they cover is
    taken from them instead of streamed. The result is in grid order either way.

    jobs: runs at once, each in its own process with one torch thread (the runs are independent and
    deterministic by seed, so the results do not depend on ``jobs``); 1 = in this process."""
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if not models or not variants or not prompts or not seeds:
        raise ConfigError("the ablation needs at least one model, variant, prompt and seed")
    for name, model in models.items():
        path, checkpoint = model if isinstance(model, tuple) else (model, None)
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise ConfigError(f"model {name!r}: checkpoint {checkpoint} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"model {name!r}: {path} is not a model directory (no config.json); "
                "make one with `rf-world model-dir`"
            )
    engines = dict(engines or {})
    for name, engine in engines.items():
        if name not in models:
            raise ConfigError(f"engine {name!r} names no model: give --model {name}=DIR too")
        if not os.path.isfile(os.path.join(engine, "manifest.json")):
            raise ConfigError(f"engine {name!r}: {engine} is not an engine bundle (no manifest.json)")
    cells = [
        (model, variant, prompt, seed)
        for model in models
        for variant in variants
        for prompt in prompts
        for seed in seeds
    ]

    done = {(r.model, r.variant, r.prompt, r.seed): r for r in reuse or []}
    todo = [c for c in cells if c not in done]
    if len(todo) < len(cells):
        logger.info("%d of %d runs reused, %d to stream", len(cells) - len(todo), len(cells), len(todo))
        if on_run:
            for c in cells:
                if c in done:
                    on_run(done[c])

    def in_grid_order(made: list[Run]) -> list[Run]:
        new = dict(zip(todo, made))
        return [done[c] if c in done else new[c] for c in cells]

    def record(cell, outcome) -> Run:
        model, variant, prompt, seed = cell
        result, elapsed = outcome
        metrics = run_metrics(result)
        run = Run(model, variant, prompt, seed, metrics, result.per_segment["flow_score"], elapsed)
        logger.info("%s / %s / %r / seed %d: %s", model, variant, prompt, seed, metrics)
        if on_run:
            on_run(run)
        return run

    if jobs == 1 or len(todo) <= 1:
        return in_grid_order(
            [
                record(c, run_one(models[c[0]], variants[c[1]], c[2], c[3], seconds, engines.get(c[0])))
                for c in todo
            ]
        )
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _run_one_in_worker, models[c[0]], variants[c[1]], c[2], c[3], seconds, engines.get(c[0])
            )
            for c in todo
        ]
        return in_grid_order([record(c, f.result()) for c, f in zip(todo, futures)])


def _mean_se(values) -> tuple[float | None, float | None]:
    """Mean and standard error of the values that are not None (None where there are too few)."""
    v = np.array([x for x in values if x is not None], np.float64)
    return (
        float(v.mean()) if len(v) else None,
        float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
    )


def summarize(runs: list[Run]) -> list[dict]:
    """Mean and standard error of each metric per (model, variant), in the order first seen."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.variant), []).append(r)
    rows = []
    for (model, variant), rs in groups.items():
        row = {"model": model, "variant": variant, "runs": len(rs)}
        for m in METRICS:
            row[m], row[m + "_se"] = _mean_se(r.metrics.get(m) for r in rs)
        rows.append(row)
    return rows


PAIRED_METRICS = ("flow_score", "travel", "drift", "subject_consistency", "prompt_adherence") + FOLLOW_METRICS


def paired_differences(runs: list[Run]) -> list[dict]:
    """Each (model, variant) against the first one, paired by (prompt, seed): mean and standard error of
    the per-pair difference. Pairing removes the spread between prompts, which dominates the standard
    errors of ``summarize`` when the prompts differ in difficulty."""
    groups: dict[tuple[str, str], dict[tuple[str, int], Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.variant), {})[(r.prompt, r.seed)] = r
    if not groups:
        return []
    (base_key, base), *others = groups.items()
    rows = []
    for (model, variant), group in others:
        pairs = [(run, base[k]) for k, run in group.items() if k in base]
        row = {
            "model": model,
            "variant": variant,
            "against": f"{base_key[0]} / {base_key[1]}",
            "pairs": len(pairs),
        }
        for m in PAIRED_METRICS:
            row[m], row[m + "_se"] = _mean_se(
                a.metrics[m] - b.metrics[m]
                for a, b in pairs
                if a.metrics.get(m) is not None and b.metrics.get(m) is not None
            )
            row[m + "_detectable"] = detectable(row[m + "_se"])
        rows.append(row)
    return rows


def _table(head: list[str], rows: list[dict], lead: list[str], metrics, signed: bool) -> str:
    """A markdown table: the ``lead`` keys of each row as they are, then each metric as mean ± se."""

    def cell(r, m):
        if r[m] is None:
            return "-"
        se = r.get(m + "_se")
        return (f"{r[m]:+.2f}" if signed else f"{r[m]:.2f}") + (f" ± {se:.2f}" if se is not None else "")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [
        "| " + " | ".join([str(r[k]) for k in lead] + [cell(r, m) for m in metrics]) + " |" for r in rows
    ]
    return "\n".join(lines)


FOLLOW_HEADS = ("colour %", "background %", "shape %", "one object %", "motion %")


def markdown_table(rows: list[dict]) -> str:
    head = [
        "model",
        "cache",
        "runs",
        "dynamic degree %",
        "flow (px)",
        "travel (px)",
        "drift",
        "quality drift",
        "subject consistency %",
        "prompt adherence %",
        *FOLLOW_HEADS,
    ]
    return _table(head, rows, ["model", "variant", "runs"], METRICS, signed=False)


def paired_table(rows: list[dict]) -> str:
    head = [
        "model",
        "cache",
        "against",
        "pairs",
        "flow (px)",
        "travel (px)",
        "drift",
        "subject consistency %",
        "prompt adherence %",
        *FOLLOW_HEADS,
    ]
    return _table(head, rows, ["model", "variant", "against", "pairs"], PAIRED_METRICS, signed=True)


def read_runs(path: str) -> tuple[str, list[Run]]:
    """The command and runs of an ablation.json written by ``write_report``."""
    import json

    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: give the ablation.json of an earlier `rf-world ablate`")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        runs = [Run(**r) for r in data["runs"]]
        command = data["command"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not an ablation.json of `rf-world ablate` ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(command, str):
        raise ConfigError(f"{path} is not an ablation.json of `rf-world ablate` (its 'command' is not text)")
    return command, runs


def write_report(runs: list[Run], out_dir: str, command: str, reused_from: dict | None = None) -> list[str]:
    """ablation.json (every run), ablation.md (the table + the command), and plots (matplotlib).
    reused_from: {"path", "command", "runs"} when some runs were taken from an earlier ablation.json."""
    from rf_runtime.errors import require
    from rf_runtime.files import atomic_save
    from rf_runtime.world.training import save_json

    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(runs)
    paired = paired_differences(runs)
    written = [
        save_json(
            {
                "command": command,
                **({"reused_from": reused_from} if reused_from else {}),
                "summary": rows,
                "paired": paired,
                "runs": [dataclasses.asdict(r) for r in runs],
            },
            os.path.join(out_dir, "ablation.json"),
        )
    ]
    md = (
        f"# Ablation on the procedural-world model\n\nMade by:\n\n    {command}\n\n"
        + (
            f"{reused_from['runs']} of the {len(runs)} runs were taken from `{reused_from['path']}`, made by:\n\n"
            f"    {reused_from['command']}\n\n"
            if reused_from
            else ""
        )
        + f"{markdown_table(rows)}\n\n"
        "Mean ± standard error over prompts and seeds. Metrics: `rf_runtime/eval.py`.\n"
    )
    if paired:
        md += (
            "\nDifferences against the first row, paired by prompt and seed (mean ± standard error of the "
            f"per-pair difference):\n\n{paired_table(paired)}\n\n"
            "A true difference of about 2.8 standard errors (the `*_detectable` values in ablation.json) is "
            "what these pairs find with 80 % power at a two-sided 5 % level; smaller effects may be there "
            "unseen.\n"
        )

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(md)

    written.append(atomic_save(write_md, os.path.join(out_dir, "ablation.md")))

    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['model']}\n{r['variant']}" if len({x["model"] for x in rows}) > 1 else r["variant"] for r in rows
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, m, title in zip(
        axes.flat,
        ("dynamic_degree", "flow_score", "travel", "drift", "subject_consistency", "prompt_adherence"),
        (
            "dynamic degree % (higher: more motion)",
            "flow score, px (higher: more motion)",
            "travel, px (how far the object goes)",
            "drift (lower: steadier)",
            "subject consistency %",
            "prompt adherence %",
        ),
    ):
        vals = [r[m] or 0.0 for r in rows]
        errs = [r.get(m + "_se") or 0.0 for r in rows]
        ax.bar(range(len(rows)), vals, yerr=errs, color="tab:blue", capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    path = os.path.join(out_dir, "ablation_metrics.png")
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, r in zip(labels, rows):
        curves = [
            run.per_segment_flow for run in runs if (run.model, run.variant) == (r["model"], r["variant"])
        ]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(np.arange(n) * 5 + 2.5, mean, marker="o", label=label.replace("\n", " / "))
    ax.set_xlabel("time in the stream (s), 5 s segments")
    ax.set_ylabel("flow score (px, VBench top-5 % magnitude)")
    ax.set_title("motion over the stream")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "ablation_motion_over_time.png")
    atomic_save(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)
    plt.close(fig)
    written.append(path)
    return written
