"""Engine bundles: a directory of graphs plus ``manifest.json``, validated before anything runs.

The manifest records the schema version, the model and stream settings, every file with its
sha256, and a model card. A bundle that does not match (missing or altered file, unknown schema)
is refused with a message naming the file and the command that rebuilds it. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from rf_runtime.errors import RFError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `rf-export onnx --model-dir MODEL_DIR --out BUNDLE`"


class BundleError(RFError):
    """An engine bundle is missing, altered or of an unknown version."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: str
    manifest: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, self.manifest["files"][name]["path"])

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify_hashes: bool = True) -> "Bundle":
        path = os.fspath(path)
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise BundleError(f"{path} is not an engine bundle: {MANIFEST} is missing; {REBUILD}")
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{mpath} is not valid JSON ({exc}); {REBUILD}") from exc
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema_version {version!r} is not supported (this runtime reads "
                              f"{SCHEMA_VERSION}); {REBUILD}")
        for key in ("files", "model", "stream", "model_card"):
            if key not in manifest:
                raise BundleError(f"{mpath}: required key {key!r} is missing; {REBUILD}")
        for name, entry in manifest["files"].items():
            fpath = os.path.join(path, entry["path"])
            if not os.path.isfile(fpath):
                raise BundleError(f"bundle file {fpath} ({name}) is missing; {REBUILD}")
            if verify_hashes and sha256(fpath) != entry["sha256"]:
                raise BundleError(f"bundle file {fpath} ({name}) does not match its sha256 in {MANIFEST}: it was "
                                  f"altered or truncated; {REBUILD}")
        return cls(path, manifest)


DEFAULT_ENGINE = "procedural-world-64"
"""The bundle ``rf-generate`` uses when given no model: a small model trained on the procedural world."""


def default_engine_dir() -> str:
    """Where the default bundle lives: ``engines/<DEFAULT_ENGINE>`` beside the installed package
    (``rf_runtime/engines/...``, for wheels that carry it) or at the root of the source checkout
    the package runs from (``pip install -e .``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "engines", DEFAULT_ENGINE),
                  os.path.join(os.path.dirname(here), "engines", DEFAULT_ENGINE)]
    for path in candidates:
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return path
    raise BundleError(f"the default engine bundle {DEFAULT_ENGINE!r} is not installed (looked in "
                      f"{' and '.join(candidates)}): install rf_runtime from a source checkout with `pip install -e .`, "
                      "or pass a model with --engine BUNDLE or --model-dir DIR")


def write_manifest(path: str, manifest: dict) -> None:
    """Hash every listed file and write manifest.json atomically."""
    for entry in manifest["files"].values():
        entry["sha256"] = sha256(os.path.join(path, entry["path"]))
    manifest = {"schema_version": SCHEMA_VERSION, **manifest}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, MANIFEST))
