"""The Runner interface every execution backend implements (in the style of Polygraphy's BaseRunner).

A runner executes one graph. Its public methods check state and arguments; backends override
only the ``*_impl`` methods. Tensors are keyed by the graph's tensor names and checked against the
graph's metadata (``GraphSpec``: name, shape, dtype of every input and output, as the bundle
manifest records them).

Two ways to run:

- ``infer(feed)``: host numpy arrays in, host numpy arrays out, every input checked on every call.
  The outputs live in buffers the runner owns and are overwritten by the next ``infer``.
- ``bind(buffers)`` once, then ``run(binding)`` per call: a ``Binding`` holds one ``Buffer`` for
  every input and output, bound to the backend once (onnxruntime IOBinding, TensorRT tensor
  addresses). Buffers are checked when bound; ``Binding.set`` rebinds one name to another
  preallocated buffer (a pointer change, no copy), which is how per-step tables and ping-pong
  buffers are switched without allocating. This is the hot path of the streaming runtime.

    with OnnxRuntimeRunner("dit_step.onnx", graph) as runner:
        outputs = runner.infer({"x": x, ...})            # checked, convenient
        b = runner.bind()                                 # runner-allocated buffers
        runner.write(b["x"], x); runner.run(b); runner.read(b["x0"])

No torch here: the onnxruntime and TensorRT runners must import without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from rf_runtime.dtypes import ITEMSIZE
from rf_runtime.dtypes import nbytes as dtype_nbytes
from rf_runtime.dtypes import NUMPY as DTYPES  # dtype names of the manifest -> numpy (rf_runtime.dtypes)
from rf_runtime.errors import RFError


class RunnerError(RFError):
    """A runner was used in the wrong state, or given tensors that do not match its graph."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, static shape and dtype name ("float32", "float16", ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def nbytes(self) -> int:
        return dtype_nbytes(self.dtype, int(np.prod(self.shape, dtype=np.int64)))


@dataclass(frozen=True)
class GraphSpec:
    """The inputs and outputs of one graph, in graph order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_manifest(cls, name: str, entry: Mapping) -> "GraphSpec":
        """From a manifest ``graphs`` entry: {"inputs": [{"name", "shape", "dtype"}, ...], "outputs": [...]}."""
        return cls(
            name,
            tuple(TensorSpec.from_dict(d) for d in entry["inputs"]),
            tuple(TensorSpec.from_dict(d) for d in entry["outputs"]),
        )

    @cached_property
    def tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in (*self.inputs, *self.outputs)}

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def compare(self, other: "GraphSpec") -> list[str]:
        """Differences to ``other`` (another description of the same graph), as readable lines."""
        problems = []
        for kind, mine, theirs in (
            ("input", self.inputs, other.inputs),
            ("output", self.outputs, other.outputs),
        ):
            a, b = {t.name: t for t in mine}, {t.name: t for t in theirs}
            for name in sorted(set(a) - set(b)):
                problems.append(f"{kind} {name!r} is declared but the graph has no such {kind}")
            for name in sorted(set(b) - set(a)):
                problems.append(f"the graph has {kind} {name!r}, which is not declared")
            for name in sorted(set(a) & set(b)):
                if (a[name].shape, a[name].dtype) != (b[name].shape, b[name].dtype):
                    problems.append(
                        f"{kind} {name!r}: declared {list(a[name].shape)} {a[name].dtype}, the graph "
                        f"has {list(b[name].shape)} {b[name].dtype}"
                    )
        return problems


@dataclass(eq=False)
class Buffer:
    """A tensor's memory, owned by a runner: host (numpy) or device memory at address ``ptr``.

    ``host`` is a numpy array over the same memory where the memory is host memory, else None.
    ``owner`` keeps the memory alive (numpy array, OrtValue, torch tensor, device allocation).
    """

    shape: tuple[int, ...]
    dtype: str
    device: str  # "cpu" or "cuda"
    ptr: int
    host: np.ndarray | None = None
    owner: Any = None
    base: "Buffer | None" = field(default=None, repr=False)  # the buffer a view was taken from

    def __post_init__(self):
        self.nbytes = dtype_nbytes(self.dtype, int(np.prod(self.shape, dtype=np.int64)))

    def view(self, offset: int, shape: tuple[int, ...]) -> "Buffer":
        """A buffer over ``prod(shape)`` elements of this one, starting at element ``offset``."""
        n = int(np.prod(shape, dtype=np.int64))
        total = int(np.prod(self.shape, dtype=np.int64))
        if offset < 0 or offset + n > total:
            raise RunnerError(f"a view of {n} elements at offset {offset} does not fit a buffer of {total}")
        host = None if self.host is None else self.host.reshape(-1)[offset : offset + n].reshape(shape)
        if ITEMSIZE[self.dtype] < 1 and offset % 2:
            raise RunnerError(f"a view of a {self.dtype} buffer must start at an even element (two per byte)")
        return Buffer(
            tuple(shape),
            self.dtype,
            self.device,
            self.ptr + dtype_nbytes(self.dtype, offset),
            host,
            self.owner,
            self.base or self,
        )


def check_buffer(spec: TensorSpec, buffer: Buffer, graph: str) -> None:
    if not isinstance(buffer, Buffer):
        raise RunnerError(
            f"{graph}: {spec.name!r} must be a Buffer from the runner's allocate(), got "
            f"{type(buffer).__name__}; use infer() to pass numpy arrays"
        )
    if buffer.shape != spec.shape or buffer.dtype != spec.dtype:
        raise RunnerError(
            f"{graph}: buffer for {spec.name!r} is {list(buffer.shape)} {buffer.dtype}, the graph "
            f"needs {list(spec.shape)} {spec.dtype}"
        )


def _overlaps(a: Buffer, b: Buffer) -> bool:
    return a.device == b.device and a.ptr < b.ptr + b.nbytes and b.ptr < a.ptr + a.nbytes


class Binding:
    """One buffer per graph input and output, bound to a runner once. ``set`` rebinds one name."""

    def __init__(self, runner: "Runner", buffers: dict[str, Buffer]):
        self.runner = runner
        self.buffers = buffers
        self.impl: Any = None  # the backend's bound object (IOBinding, execution context, ...)

    def __getitem__(self, name: str) -> Buffer:
        return self.buffers[name]

    def set(self, name: str, buffer: Buffer) -> None:
        """Bind ``name`` to another preallocated buffer (no copy). A no-op when it is already bound."""
        if self.buffers.get(name) is not buffer:
            self.update({name: buffer})

    def update(self, buffers: Mapping[str, Buffer]) -> None:
        """Rebind several names at once (swapping ping-pong buffers needs the new set checked as a
        whole). Names already bound to the given buffer are left alone."""
        graph = self.runner.graph
        tensors = graph.tensors
        changed = []
        for name, buffer in buffers.items():
            if self.buffers.get(name) is buffer:
                continue
            spec = tensors.get(name)
            if spec is None:
                raise RunnerError(f"{graph.name} has no tensor {name!r}; its tensors are {sorted(tensors)}")
            check_buffer(spec, buffer, graph.name)
            changed.append(name)
        if not changed:
            return
        previous = {name: self.buffers[name] for name in changed}
        for name in changed:
            self.buffers[name] = buffers[name]
        try:
            for name in changed:
                self.runner._check_aliasing(self, name, self.buffers[name])
                self.runner.check_address(name, self.buffers[name])
        except RunnerError:
            self.buffers.update(previous)
            raise
        for name in changed:
            self.runner.rebind_impl(self, name)


class Runner(ABC):
    """Runs one graph. Subclasses implement the ``*_impl`` methods only."""

    device = "cpu"
    rebuild = "rebuild the bundle (rf-export onnx)"  # the fix when the loaded graph is not the declared one

    def __init__(self, graph: GraphSpec | None, name: str | None = None):
        self.graph = graph
        self.name = name or (graph.name if graph else type(self).__name__)
        self.is_active = False
        self._infer_binding: Binding | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def activate(self) -> "Runner":
        if self.is_active:
            raise RunnerError(f"runner {self.name} is already active: deactivate() it first")
        self.activate_impl()
        self._check_loaded_graph()
        if self.graph is None:
            raise RunnerError(f"runner {self.name}: activate_impl must set the graph spec")
        self._input_names = tuple(self.graph.input_names())
        self._output_names = tuple(self.graph.output_names())
        self.is_active = True
        return self

    def _check_loaded_graph(self) -> None:
        """The IO the backend loaded (``loaded_graph_impl``) against the declared IO, once, for every runner:
        without a declared graph the loaded one is taken; a difference is refused with the fix."""
        actual = self.loaded_graph_impl()
        if actual is None:
            return
        if self.graph is None:
            self.graph = actual
            return
        problems = self.graph.compare(actual)
        if problems:
            self.deactivate_impl()
            where = getattr(self, "path", None) or self.name
            raise RunnerError(
                f"{where}: the graph does not match its declared IO: "
                + "; ".join(problems)
                + f"; {self.rebuild}"
            )

    def deactivate(self) -> None:
        if not self.is_active:
            raise RunnerError(f"runner {self.name} is not active: activate() it first")
        self._infer_binding = None
        self.deactivate_impl()
        self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        if self.is_active:
            self.deactivate()

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise RunnerError(
                f"runner {self.name}: {what} before activate(); call activate() or use `with runner:` first"
            )

    # ---- buffers -----------------------------------------------------------------------------

    def allocate(self, shape, dtype: str = "float32") -> Buffer:
        """Memory for one tensor on the runner's device, owned by the caller's Binding or state."""
        self._require_active("allocate()")
        if dtype not in ITEMSIZE:
            raise RunnerError(f"dtype {dtype!r} is not supported; use one of {sorted(ITEMSIZE)}")
        return self.allocate_impl(tuple(int(s) for s in shape), dtype)

    def write(self, buffer: Buffer, array: np.ndarray) -> None:
        """Copy a host array into a buffer (cast to the buffer's dtype; the shape must match)."""
        if tuple(np.shape(array)) != buffer.shape:
            raise RunnerError(
                f"{self.name}: cannot write an array of shape {list(np.shape(array))} into a buffer "
                f"of shape {list(buffer.shape)}"
            )
        self.write_impl(buffer, array)

    def read(self, buffer: Buffer) -> np.ndarray:
        """The buffer's contents on the host. For host buffers this is the buffer's own memory (no
        copy); otherwise a host array. Either way it is overwritten by the next run: copy to keep."""
        return self.read_impl(buffer)

    def bind(self, buffers: Mapping[str, Buffer] | None = None) -> Binding:
        """Bind a buffer to every input and output; the ones not given are allocated here."""
        self._require_active("bind()")
        buffers = dict(buffers or {})
        tensors = self.graph.tensors
        unknown = sorted(set(buffers) - set(tensors))
        if unknown:
            raise RunnerError(
                f"{self.graph.name} has no tensors {unknown}; its tensors are {sorted(tensors)}"
            )
        for name, spec in tensors.items():
            if name in buffers:
                check_buffer(spec, buffers[name], self.graph.name)
            else:
                buffers[name] = self.allocate(spec.shape, spec.dtype)
        binding = Binding(self, buffers)
        for spec in self.graph.inputs:
            self._check_aliasing(binding, spec.name, buffers[spec.name])
        self.bind_impl(binding)
        return binding

    def check_address(self, name: str, buffer: Buffer) -> None:
        """Refuse an address the backend cannot bind (TensorRT: 256-byte alignment); checked before a
        rebinding changes anything. Nothing to check by default."""

    def _check_aliasing(self, binding: Binding, name: str, buffer: Buffer) -> None:
        """An input may not share memory with an output (onnxruntime and TensorRT cannot alias):
        use two buffers and swap them between calls (ping-pong)."""
        outputs = self._output_names
        others = self._input_names if name in outputs else outputs
        for other in others:
            b = binding.buffers.get(other)
            if b is not None and _overlaps(b, buffer):
                raise RunnerError(
                    f"{self.graph.name}: {name!r} and {other!r} would share memory; an output cannot "
                    "overwrite an input during the call: use two buffers and swap them (ping-pong)"
                )

    # ---- running -----------------------------------------------------------------------------

    def run(self, binding: Binding) -> None:
        """Run the graph on a binding's buffers; outputs land in the binding's output buffers."""
        self._require_active("run()")
        if binding.runner is not self:
            raise RunnerError(f"this binding belongs to runner {binding.runner.name}, not {self.name}")
        self.run_impl(binding)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``feed`` against the graph (names, shapes, dtypes), run, return the named outputs.

        The returned arrays are the runner's (overwritten by the next call): copy them to keep them.
        """
        self._require_active("infer()")
        self.check_feed(feed)
        if self._infer_binding is None:
            self._infer_binding = self.bind()
        b = self._infer_binding
        for spec in self.graph.inputs:
            self.write(b[spec.name], feed[spec.name])
        self.run(b)
        return {spec.name: self.read(b[spec.name]) for spec in self.graph.outputs}

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        g = self.graph
        missing = [n for n in g.input_names() if n not in feed]
        extra = sorted(set(feed) - set(g.input_names()))
        if missing or extra:
            raise RunnerError(
                f"{g.name}: inputs do not match the graph (missing {missing}, unexpected {extra}); "
                f"it takes {g.input_names()}"
            )
        for spec in g.inputs:
            value = feed[spec.name]
            if not isinstance(value, np.ndarray):
                raise RunnerError(
                    f"{g.name}: input {spec.name!r} must be a numpy array, got {type(value).__name__}"
                )
            if value.shape != spec.shape:
                raise RunnerError(
                    f"{g.name}: input {spec.name!r} has shape {list(value.shape)}, the graph needs "
                    f"{list(spec.shape)}"
                )
            if spec.dtype not in DTYPES:
                raise RunnerError(
                    f"{g.name}: input {spec.name!r} is {spec.dtype}, which numpy cannot hold: bind a "
                    "device buffer with bind() / run() instead of infer()"
                )
            if value.dtype != DTYPES[spec.dtype]:
                raise RunnerError(
                    f"{g.name}: input {spec.name!r} is {value.dtype}, the graph needs {spec.dtype}; "
                    f"convert it with .astype(np.{spec.dtype})"
                )

    # ---- what a backend implements -----------------------------------------------------------

    @abstractmethod
    def activate_impl(self) -> None:
        """Load the graph or engine; set ``self.graph`` if it was not given."""

    def loaded_graph_impl(self) -> GraphSpec | None:
        """The IO of the graph or engine that ``activate_impl`` loaded, as the backend reports it; None
        where the backend cannot tell (a torch module has no tensor names)."""
        return None

    @abstractmethod
    def deactivate_impl(self) -> None:
        """Release what activate_impl acquired."""

    @abstractmethod
    def allocate_impl(self, shape: tuple[int, ...], dtype: str) -> Buffer: ...

    @abstractmethod
    def write_impl(self, buffer: Buffer, array: np.ndarray) -> None: ...

    @abstractmethod
    def read_impl(self, buffer: Buffer) -> np.ndarray: ...

    @abstractmethod
    def bind_impl(self, binding: Binding) -> None:
        """Bind every buffer of ``binding`` to the backend once (store the bound object in binding.impl)."""

    @abstractmethod
    def rebind_impl(self, binding: Binding, name: str) -> None:
        """Bind ``binding.buffers[name]`` in place of the previous buffer of that name."""

    @abstractmethod
    def run_impl(self, binding: Binding) -> None: ...


def host_buffer(shape: tuple[int, ...], dtype: str) -> Buffer:
    """A zeroed host buffer (numpy memory), shared by the CPU runners."""
    if dtype not in DTYPES:
        raise RunnerError(f"dtype {dtype} has no host representation; it can only live on a GPU")
    array = np.zeros(shape, DTYPES[dtype])
    return Buffer(shape, dtype, "cpu", array.ctypes.data, array, array)


def write_host(buffer: Buffer, array: np.ndarray) -> None:
    np.copyto(buffer.host, array, casting="same_kind")
