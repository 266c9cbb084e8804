"""Engine bundles: a directory of graphs (and TensorRT plans) plus ``manifest.json``, validated
before anything runs. The manifest format is schema_version 2 (the project's SCHEMA.md):

- ``files``: every file of the bundle with its relative path, sha256 and size in bytes;
- ``graphs``: every graph's file, precision and declared inputs/outputs (name, shape, dtype);
- ``plans``: TensorRT engines built from a graph, with the TensorRT version and GPU compute
  capability they were built for (optional);
- ``text_encoder``, ``model``, ``stream``: what the runtime needs to run the graphs;
- ``batch`` (optional): the batch sizes the per-chunk graphs were exported for and their graphs per
  size; without it a bundle serves batch 1 (``batch_sizes``);
- ``model_card``: where the weights came from, training stage, chunk / sink / window sizes,
  resolution, the longest stream the bundle was tested on;
- ``producer``: versions of the tools that wrote it.

A bundle that does not match is refused (``BundleError``) with a message naming the file and the
command that rebuilds it: a missing, truncated or altered file, an unknown schema, a graph whose
declared IO differs from the .onnx (checked here when ``onnx`` is importable, else by the runner
against the session's metadata), a plan for another TensorRT version or GPU. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field

from rf_runtime.dtypes import ONNX
from rf_runtime.errors import RFError
from rf_runtime.files import atomic_write
from rf_runtime.runners.base import ITEMSIZE, GraphSpec
from rf_runtime.schema import parse

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `rf-export onnx --model-dir MODEL_DIR --out BUNDLE`"
REBUILD_TRT = "rebuild the engines with `rf-export trt BUNDLE`"
PRECISIONS = ("fp32", "fp16", "bf16")
# dmd: distilled without a reward (the ablation's baseline); re-dmd: reward-weighted; release: the paper's weights
TRAINING_STAGES = ("random", "teacher", "student", "dmd", "re-dmd", "release")
REQUIRED = ("files", "graphs", "text_encoder", "model", "stream", "model_card")
ONNX_DTYPES = ONNX  # ONNX TensorProto element types -> manifest dtype names (rf_runtime.dtypes)

logger = logging.getLogger("rf_runtime")


class BundleError(RFError):
    """An engine bundle is missing, altered, of an unknown version, or built for another machine."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def graph_io_from_onnx(path: str) -> dict:
    """{"inputs": [...], "outputs": [...]} of an .onnx file (names, static shapes, dtypes), read
    without loading external weight files. Needs ``onnx``."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise BundleError(f"{path} is not a readable ONNX graph ({type(exc).__name__}); {REBUILD}") from exc

    def entries(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if any(d is None for d in dims):
                raise BundleError(
                    f"{path}: {v.name} has a dynamic shape; bundles hold static-shape graphs; {REBUILD}"
                )
            out.append(
                {"name": v.name, "shape": dims, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type))}
            )
        return out

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return {"inputs": entries(inputs), "outputs": entries(model.graph.output)}


def plan_problem(plan: dict, tensorrt_version: str | None, compute_capability: str | None) -> str | None:
    """Why a TensorRT plan cannot run here, or None when it can.

    A plan runs only under the TensorRT version it was built with (major.minor.patch) and on a GPU
    of the compute capability it was built for. ``tensorrt_version`` / ``compute_capability`` are
    this machine's (None: TensorRT not installed / no GPU).
    """
    if tensorrt_version is None:
        return "TensorRT is not installed (pip install 'rf_runtime[gpu]')"
    if compute_capability is None:
        return "no CUDA GPU is visible"
    built = str(plan.get("tensorrt_version", "?"))
    if built.split(".")[:3] != str(tensorrt_version).split(".")[:3]:
        return f"it was built with TensorRT {built}, this machine has TensorRT {tensorrt_version}"
    if str(plan.get("compute_capability")) != str(compute_capability):
        return (
            f"it was built for compute capability {plan.get('compute_capability')} "
            f"({plan.get('device_name', 'unknown GPU')}), this GPU is {compute_capability}"
        )
    return None


# ---- the manifest's schema (rf_runtime.schema.parse checks a manifest against it, naming the bad key) ----


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class GraphEntry:
    file: str
    precision: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    external_data: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanEntry:
    _extra_keys = True  # the TensorRT builder may record more about a plan (precision, device name, ...)
    file: str
    tensorrt_version: str
    compute_capability: str


@dataclass(frozen=True)
class DiTSection:
    _extra_keys = True  # the whole DiT config; the runtime reads these
    dim: int
    num_heads: int
    num_layers: int
    text_len: int
    text_dim: int
    freq_dim: int


@dataclass(frozen=True)
class ModelSection:
    dit: DiTSection
    latent_channels: int
    latent_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    vae_stride: tuple[int, int, int]
    fps: int
    vae_cache_slots: int
    vae_cache_shapes: tuple[tuple[int, ...], ...]
    precision: str


@dataclass(frozen=True)
class StreamSection:  # sampler.StreamSettings, as JSON
    chunk_frames: int
    sink_frames: int
    window_frames: int
    ema_alpha: float
    timesteps: tuple[float, ...]
    shift: float
    warp: bool
    context_t: float
    num_train_timesteps: int


@dataclass(frozen=True)
class BatchSection:
    """The batch sizes a bundle serves (``rf-export onnx --batch-sizes 1,2,4``): ``sizes`` always holds
    1 (the plain graphs); ``graphs`` maps every other size ("2") to its per-chunk graphs ({"dit_step":
    "dit_step_b2", ...}, ``graph_io.BATCHED_GRAPHS``), static shapes with that many rows. A bundle without
    the section serves batch 1 only (bundles written before it existed)."""

    sizes: tuple[int, ...]
    graphs: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    files: dict[str, FileEntry]
    graphs: dict[str, GraphEntry]
    text_encoder: dict
    model: ModelSection
    stream: StreamSection
    model_card: dict  # ModelCard, checked by ModelCard.from_dict
    producer: dict = field(default_factory=dict)
    plans: dict[str, PlanEntry] = field(default_factory=dict)
    batch: BatchSection | None = None


def check_manifest(manifest, where: str) -> None:
    """Every key of a manifest against the schema above: a BundleError naming the bad key and its type."""
    parse(
        Manifest, manifest, where=where, error=BundleError, hint=REBUILD
    )  # the model card: ModelCard.from_dict


@dataclass(frozen=True)
class ModelCard:
    """What the bundle's weights are and what it was checked on (manifest ``model_card``)."""

    name: str
    source: str
    checkpoint: str | None
    training_stage: str
    chunk_frames: int
    sink_frames: int
    window_frames: int
    resolution: tuple[int, int]
    longest_tested_frames: int | None = None
    note: str | None = None
    vocabulary: tuple[str, ...] | None = None  # the words the model was trained on (None: any, e.g. umT5)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ModelCard":
        card = parse(cls, d, where=where, error=BundleError, hint=REBUILD, prefix="model_card.")
        if card.training_stage not in TRAINING_STAGES:
            raise BundleError(
                f"{where}: model_card training_stage {card.training_stage!r} is not one of "
                f"{list(TRAINING_STAGES)}; {REBUILD}"
            )
        for value in (card.source, card.checkpoint):
            if value and os.path.isabs(value):
                raise BundleError(
                    f"{where}: model_card names an absolute path ({value}); a bundle must not carry "
                    f"paths of the machine that built it; {REBUILD}"
                )
        return card

    def check_settings(self, settings, frame_hw: tuple[int, int]) -> None:
        """Refuse stream settings the weights were not made for (chunk, sink, window, resolution)."""
        for name in ("chunk_frames", "sink_frames", "window_frames"):
            mine, theirs = getattr(self, name), getattr(settings, name)
            if mine != theirs:
                raise BundleError(
                    f"the bundle's model card says {name}={mine} but the stream settings say "
                    f"{name}={theirs}: the graphs and weights are built for {name}={mine}; fix the "
                    f"manifest's 'stream' entry or {REBUILD}"
                )
        if tuple(self.resolution) != tuple(frame_hw):
            raise BundleError(
                f"the bundle's model card says resolution {list(self.resolution)} but its graphs make "
                f"{list(frame_hw)} frames; {REBUILD}"
            )

    def check_prompt(self, prompt: str) -> list[str]:
        """Warn (rf_runtime logger) when the prompt has words outside the model's vocabulary; returns them."""
        if self.vocabulary is None:
            return []
        known = set(self.vocabulary)
        unknown = [w for w in dict.fromkeys(re.findall(r"[a-z0-9]+", prompt.lower())) if w not in known]
        if unknown:
            logger.warning(
                "model %r does not know the words %s of the prompt %r: it was trained on a world of "
                "coloured shapes and knows only: %s",
                self.name,
                ", ".join(unknown),
                prompt,
                " ".join(self.vocabulary),
            )
        return unknown

    def check_length(self, num_frames: int | None) -> None:
        """Warn (rf_runtime logger) when a stream is longer than any the bundle was tested on."""
        limit = self.longest_tested_frames
        if limit is not None and (num_frames is None or num_frames > limit):
            asked = "an unbounded stream" if num_frames is None else f"{num_frames} frames"
            logger.warning(
                "%s requested, but bundle %r was tested on streams of at most %d frames: quality "
                "beyond that is unverified",
                asked,
                self.name,
                limit,
            )


@dataclass(frozen=True)
class Bundle:
    path: str
    manifest: dict
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    model_card: ModelCard | None = None
    io_checked_against_onnx: bool = False  # False: the runners check IO against their session metadata

    def file(self, key: str) -> str:
        return os.path.join(self.path, self.manifest["files"][key]["path"])

    def graph_file(self, graph: str) -> str:
        return self.file(self.manifest["graphs"][graph]["file"])

    @property
    def plans(self) -> dict:
        return self.manifest.get("plans", {})

    def plan_problems(self, tensorrt_version: str | None, compute_capability: str | None) -> dict[str, str]:
        """{plan name: why it cannot run here} for every plan that cannot (empty: all can)."""
        return {
            name: problem
            for name, plan in self.plans.items()
            if (problem := plan_problem(plan, tensorrt_version, compute_capability)) is not None
        }

    def check_plans(self, names, tensorrt_version: str | None, compute_capability: str | None) -> None:
        """Refuse when a plan the caller needs is absent or was built for another TensorRT / GPU."""
        for name in names:
            if name not in self.plans:
                raise BundleError(f"{self.path} has no TensorRT plan for graph {name!r}; {REBUILD_TRT}")
            problem = plan_problem(self.plans[name], tensorrt_version, compute_capability)
            if problem:
                raise BundleError(
                    f"TensorRT plan {self.file(self.plans[name]['file'])} ({name}) cannot run here: "
                    f"{problem}; {REBUILD_TRT}"
                )

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify_hashes: bool = True) -> "Bundle":
        path = os.fspath(path)
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise BundleError(f"{path} is not an engine bundle: {MANIFEST} is missing; {REBUILD}")
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc}); {REBUILD}") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath} is not a manifest (a JSON object); {REBUILD}")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{mpath}: schema_version {version!r} is not supported (this runtime reads "
                f"{SCHEMA_VERSION}); {REBUILD}"
            )
        for key in REQUIRED:
            if key not in manifest:
                raise BundleError(f"{mpath}: required key {key!r} is missing; {REBUILD}")
        check_manifest(manifest, mpath)
        _check_files(path, manifest["files"], verify_hashes)
        graphs = _check_graphs(path, manifest)
        _check_external_data(path, manifest)
        _check_text_encoder(mpath, manifest)
        _check_plans(mpath, manifest)
        _check_batch(mpath, manifest)
        card = ModelCard.from_dict(manifest["model_card"], mpath)
        checked = _check_graph_io(path, manifest, graphs)
        return cls(path, manifest, graphs, card, checked)


def _check_files(path: str, files: dict, verify_hashes: bool) -> None:
    root = os.path.realpath(path)
    for key, entry in files.items():
        rel = entry.get("path", "")
        fpath = os.path.join(path, rel)
        if os.path.isabs(rel) or not os.path.realpath(fpath).startswith(root + os.sep):
            raise BundleError(
                f"bundle file {key!r} has path {rel!r}, which is not inside the bundle; {REBUILD}"
            )
        if not os.path.isfile(fpath):
            raise BundleError(f"bundle file {fpath} ({key}) is missing; {REBUILD}")
        size = os.path.getsize(fpath)
        if size != entry.get("bytes"):
            raise BundleError(
                f"bundle file {fpath} ({key}) has {size} bytes, {MANIFEST} says {entry.get('bytes')}: "
                f"it was truncated or altered; {REBUILD}"
            )
        if verify_hashes and sha256(fpath) != entry.get("sha256"):
            raise BundleError(
                f"bundle file {fpath} ({key}) does not match its sha256 in {MANIFEST}: it was "
                f"altered; {REBUILD}"
            )


def _check_graphs(path: str, manifest: dict) -> dict[str, GraphSpec]:
    files, graphs = manifest["files"], {}
    for name, entry in manifest["graphs"].items():
        where = f"{os.path.join(path, MANIFEST)}: graph {name!r}"
        for key in [entry.get("file"), *entry.get("external_data", [])]:
            if key not in files:
                raise BundleError(f"{where} refers to file {key!r}, which is not in 'files'; {REBUILD}")
        if entry.get("precision") not in PRECISIONS:
            raise BundleError(
                f"{where}: precision {entry.get('precision')!r} is not one of {list(PRECISIONS)}; {REBUILD}"
            )
        try:
            spec = GraphSpec.from_manifest(name, entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: inputs/outputs are malformed ({exc!r}); {REBUILD}") from exc
        for t in (*spec.inputs, *spec.outputs):
            if t.dtype not in ITEMSIZE:
                raise BundleError(f"{where}: tensor {t.name!r} has unknown dtype {t.dtype!r}; {REBUILD}")
        graphs[name] = spec
    return graphs


def _check_external_data(path: str, manifest: dict) -> None:
    """A bundle is a closed world: every external-data location in every graph must be a file of the
    bundle that the manifest lists (with its sha256 and size, checked by ``_check_files``) as that
    graph's ``external_data``. Checked before onnxruntime or TensorRT opens the graph, which would
    otherwise read whatever path the graph names, inside the bundle or not."""
    from rf_runtime.onnx_external import OnnxWireError, external_refs

    files = manifest["files"]
    for name, entry in manifest["graphs"].items():
        gpath = os.path.join(path, files[entry["file"]]["path"])
        try:
            refs = external_refs(gpath)
        except (OnnxWireError, OSError) as exc:
            raise BundleError(
                f"graph {name!r}: {gpath} is not a readable ONNX file ({exc}); {REBUILD}"
            ) from exc
        allowed = {
            os.path.realpath(os.path.join(path, files[k]["path"])): k for k in entry.get("external_data", [])
        }
        for ref in refs:
            locations = ref.locations
            if len(locations) != 1:
                raise BundleError(
                    f"graph {name!r} in {gpath}: tensor {ref.tensor!r} has {len(locations)} external-data "
                    f"locations (one is needed); {REBUILD}"
                )
            loc = locations[0]
            target = os.path.realpath(os.path.join(os.path.dirname(gpath), loc))
            if target not in allowed:
                where = (
                    "a file outside the bundle"
                    if os.path.isabs(loc) or not target.startswith(os.path.realpath(path) + os.sep)
                    else f"a file the manifest does not list as external data of {name!r}"
                )
                raise BundleError(
                    f"graph {name!r} in {gpath}: tensor {ref.tensor!r} reads its data from {loc!r}, "
                    f"{where}; a bundle reads only its own listed files: refused before loading; "
                    f"{REBUILD}"
                )


def _check_text_encoder(mpath: str, manifest: dict) -> None:
    """A umT5 text encoder names a graph of the bundle and a tokenizer directory whose
    tokenizer.json is one of the bundle's (hashed) files."""
    spec = manifest["text_encoder"]
    if not isinstance(spec, dict) or spec.get("kind") != "umt5":
        return
    if spec.get("graph") not in manifest["graphs"]:
        raise BundleError(f"{mpath}: text_encoder graph {spec.get('graph')!r} is not in 'graphs'; {REBUILD}")
    tokenizer = f"{spec.get('tokenizer')}/tokenizer.json"
    if tokenizer not in {f.get("path") for f in manifest["files"].values()}:
        raise BundleError(f"{mpath}: the umT5 tokenizer file {tokenizer} is not in 'files'; {REBUILD}")


def _check_plans(mpath: str, manifest: dict) -> None:
    for name, plan in manifest.get("plans", {}).items():
        if name not in manifest["graphs"]:
            raise BundleError(f"{mpath}: plan {name!r} names no graph of the bundle; {REBUILD_TRT}")
        missing = [k for k in ("file", "tensorrt_version", "compute_capability") if k not in plan]
        if missing or plan["file"] not in manifest["files"]:
            raise BundleError(
                f"{mpath}: plan {name!r} lacks {missing or ['a file listed in files']}; {REBUILD_TRT}"
            )


def batch_sizes(manifest: dict) -> tuple[int, ...]:
    """The batch sizes a bundle's graphs serve, ascending; (1,) for a bundle without a ``batch`` section."""
    section = manifest.get("batch")
    return tuple(section["sizes"]) if section else (1,)


def batch_graph_names(manifest: dict, size: int) -> dict[str, str]:
    """{graph: the graph of the bundle that runs it with ``size`` rows} for the per-chunk graphs."""
    from rf_runtime.graph_io import BATCHED_GRAPHS

    if size == 1:
        return {g: g for g in BATCHED_GRAPHS}
    return dict(manifest["batch"]["graphs"][str(size)])


def _check_batch(mpath: str, manifest: dict) -> None:
    """The batch section: sizes ascending, unique, positive, with 1; every other size names each per-chunk
    graph, and each of those is a graph of the bundle (their shapes are checked by the engine backend)."""
    from rf_runtime.graph_io import BATCHED_GRAPHS

    section = manifest.get("batch")
    if section is None:
        return
    sizes = list(section["sizes"])
    if sizes != sorted(set(sizes)) or not sizes or sizes[0] != 1:
        raise BundleError(
            f"{mpath}: batch.sizes {sizes} must be ascending, without repeats, and start with 1; {REBUILD}"
        )
    graphs = section.get("graphs", {})
    want = {str(s) for s in sizes[1:]}
    if set(graphs) != want:
        raise BundleError(
            f"{mpath}: batch.graphs has sizes {sorted(graphs)}, batch.sizes needs {sorted(want)}; {REBUILD}"
        )
    for size, names in graphs.items():
        if sorted(names) != sorted(BATCHED_GRAPHS):
            raise BundleError(
                f"{mpath}: batch.graphs.{size} names {sorted(names)}, it needs {sorted(BATCHED_GRAPHS)}; "
                f"{REBUILD}"
            )
        for graph, name in names.items():
            if name not in manifest["graphs"]:
                raise BundleError(
                    f"{mpath}: batch.graphs.{size}.{graph} is {name!r}, which is not in 'graphs'; {REBUILD}"
                )


def _check_graph_io(path: str, manifest: dict, graphs: dict[str, GraphSpec]) -> bool:
    """Declared IO against each .onnx, where onnx is importable (else the runners check it)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    for name, spec in graphs.items():
        fpath = os.path.join(path, manifest["files"][manifest["graphs"][name]["file"]]["path"])
        actual = GraphSpec.from_manifest(name, graph_io_from_onnx(fpath))
        problems = spec.compare(actual)
        if problems:
            raise BundleError(
                f"graph {name!r} in {fpath} does not match the IO {MANIFEST} declares: "
                + "; ".join(problems)
                + f"; {REBUILD}"
            )
    return True


DEFAULT_ENGINE = "procedural-world-64"
"""The bundle ``rf-generate`` uses when given no model: a small model trained on the procedural world."""


def default_engine_dir() -> str:
    """Where the default bundle lives: ``engines/<DEFAULT_ENGINE>`` beside the installed package
    (``rf_runtime/engines/...``, for wheels that carry it) or at the root of the source checkout
    the package runs from (``pip install -e .``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(here, "engines", DEFAULT_ENGINE),
        os.path.join(os.path.dirname(here), "engines", DEFAULT_ENGINE),
    ]
    for path in candidates:
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return path
    raise BundleError(
        f"the default engine bundle {DEFAULT_ENGINE!r} is not installed (looked in "
        f"{' and '.join(candidates)}): install rf_runtime from a source checkout with `pip install -e .`, "
        "or pass a model with --engine BUNDLE or --model-dir DIR"
    )


def write_manifest(path: str, manifest: dict) -> None:
    """Hash every listed file (sha256 + bytes) and write manifest.json atomically (schema 2)."""
    for entry in manifest["files"].values():
        fpath = os.path.join(path, entry["path"])
        entry["sha256"] = sha256(fpath)
        entry["bytes"] = os.path.getsize(fpath)
    manifest = {**manifest, "schema_version": SCHEMA_VERSION}
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    atomic_write(os.path.join(path, MANIFEST), lambda f: f.write(text), what="the bundle manifest")


__all__ = [
    "Bundle",
    "BundleError",
    "ModelCard",
    "SCHEMA_VERSION",
    "batch_sizes",
    "graph_io_from_onnx",
    "plan_problem",
    "write_manifest",
]
