"""MP4 output written atomically: frames go to a temporary file that is renamed when complete."""

from __future__ import annotations

import os

import numpy as np

from rf_runtime.errors import InputError, require
from rf_runtime.files import output_folder, temp_file


class Mp4Writer:
    """Write uint8 [T, H, W, 3] frame batches to an H.264 MP4 at ``fps``.

    The file appears at ``path`` only after ``close()``; an exception inside the ``with`` block
    removes the partial file and leaves any existing ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, quality: int = 8):
        self.path = os.fspath(path)
        if not self.path.lower().endswith(".mp4"):
            raise InputError(f"output {self.path!r} must end in .mp4")
        output_folder(self.path, "the video")
        self.fps, self.quality = fps, quality
        fd, self.tmp_path = temp_file(self.path, "the video", suffix=".mp4")  # ffmpeg picks the container from it
        os.close(fd)
        self._gen = None
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if self._gen is None:
            ffmpeg = require("imageio_ffmpeg", "video")
            h, w = frames.shape[1:3]
            self._gen = ffmpeg.write_frames(self.tmp_path, (w, h), fps=self.fps, codec="libx264", quality=self.quality,
                                            pix_fmt_out="yuv420p", macro_block_size=1,
                                            output_params=["-movflags", "+faststart"])
            self._gen.send(None)
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._gen is None:
            self.abort()
            raise InputError("no frames were written: nothing to save")
        self._gen.close()
        self._gen = None
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        if self._gen is not None:
            try:
                self._gen.close()
            except Exception:  # ffmpeg may already be gone; the partial file is removed anyway
                pass
            self._gen = None
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Read an MP4 back as uint8 [T, H, W, 3] (for tests and evaluation)."""
    ffmpeg = require("imageio_ffmpeg", "video")
    reader = ffmpeg.read_frames(os.fspath(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames)
