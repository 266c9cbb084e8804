"""The rf-serve wire protocol, version 1 (``/v1/``): client messages, server events, frame messages.

Client -> server (text messages, JSON objects):

    {"type": "start", "prompt": "...", "seed": 0, "paced": true, "num_frames": null}
    {"type": "prompt", "prompt": "...", "keep_sink": false}
    {"type": "stop"}

Server -> client: JSON events (text) and frames (binary). A frame message is a fixed header
(``FRAME_HEADER``, little-endian) followed by one JPEG image:

    offset  size  field
    0       2     magic b"RF"
    2       1     protocol version (1)
    3       1     header length in bytes (28)
    4       4     chunk index (uint32)
    8       4     frame index in the stream (uint32)
    12      8     made: unix time in seconds when its chunk was finished (float64)
    20      8     sent: unix time in seconds when the server sent it (float64)

docs/serving.md documents every message; this module is the one place that parses and builds them.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np

from rf_runtime.errors import RFError

VERSION = 1
FRAME_MAGIC = b"RF"
FRAME_HEADER = struct.Struct("<2sBBIIdd")


class ProtocolError(RFError):
    """A client message that the server cannot act on; sent back as an ``error`` event, the session lives on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int = 0
    paced: bool = True  # frames sent at the model's fps; False: as they are made
    num_frames: int | None = None  # None: until stopped


@dataclass(frozen=True)
class SetPrompt:
    prompt: str
    keep_sink: bool = False


@dataclass(frozen=True)
class Stop:
    pass


ClientMessage = Start | SetPrompt | Stop
_FIELDS = {
    "start": {"type", "prompt", "seed", "paced", "num_frames"},
    "prompt": {"type", "prompt", "keep_sink"},
    "stop": {"type"},
}


def check_prompt_text(prompt, max_chars: int) -> str:
    if not isinstance(prompt, str):
        raise ProtocolError("bad_prompt", f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ProtocolError(
            "bad_prompt", "'prompt' is empty: describe the video, e.g. 'a red circle bouncing'"
        )
    if len(prompt) > max_chars:
        raise ProtocolError(
            "bad_prompt", f"'prompt' has {len(prompt)} characters; at most {max_chars} are accepted"
        )
    return prompt


def _bool(msg: dict, key: str, default: bool) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError("bad_field", f"'{key}' must be true or false, got {value!r}")
    return value


def _int(msg: dict, key: str, default, low: int, high: int):
    value = msg.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError("bad_field", f"'{key}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def parse_client_message(text: str, *, max_prompt_chars: int, max_frames: int) -> ClientMessage:
    """One client text message -> Start / SetPrompt / Stop, or a ProtocolError saying what is wrong."""
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(
            "bad_json",
            f"the message is not valid JSON ({exc}): send a JSON object "
            'such as {"type": "start", "prompt": "..."}',
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"the message must be a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in _FIELDS:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}: use one of {sorted(_FIELDS)}")
    extra = set(msg) - _FIELDS[kind]
    if extra:
        raise ProtocolError(
            "bad_field",
            f"unknown field(s) {sorted(extra)} in a {kind!r} message; "
            f"it takes {sorted(_FIELDS[kind] - {'type'})}",
        )
    if kind == "stop":
        return Stop()
    if "prompt" not in msg:
        raise ProtocolError("bad_prompt", f"a {kind!r} message needs a 'prompt'")
    prompt = check_prompt_text(msg["prompt"], max_prompt_chars)
    if kind == "prompt":
        return SetPrompt(prompt, keep_sink=_bool(msg, "keep_sink", False))
    return Start(
        prompt,
        seed=_int(msg, "seed", 0, 0, 2**63 - 1),
        paced=_bool(msg, "paced", True),
        num_frames=_int(msg, "num_frames", None, 1, max_frames),
    )


def event(kind: str, **fields) -> str:
    """A server event as JSON text."""
    return json.dumps({"type": kind, **fields})


def error_event(code: str, message: str) -> str:
    return event("error", code=code, message=message)


def pack_frame(jpeg: bytes, chunk: int, frame: int, made: float, sent: float) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, VERSION, FRAME_HEADER.size, chunk, frame, made, sent) + jpeg


@dataclass(frozen=True)
class FrameHeader:
    chunk: int
    frame: int
    made: float
    sent: float


def unpack_frame(data: bytes) -> tuple[FrameHeader, bytes]:
    """A frame message -> (header, JPEG bytes); for clients written in Python (tests, the load test)."""
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError(
            "bad_frame", f"a frame message has at least {FRAME_HEADER.size} bytes, got {len(data)}"
        )
    magic, version, size, chunk, frame, made, sent = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or version != VERSION:
        raise ProtocolError(
            "bad_frame", f"not an rf-serve v{VERSION} frame (magic {magic!r}, version {version})"
        )
    return FrameHeader(chunk, frame, made, sent), data[size:]


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes (Pillow; deterministic for a given Pillow/libjpeg)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
