"""MP4 output written atomically and checked: frames go to a temporary file that is renamed once ffmpeg
exited 0 and the file reads back with every frame."""

from __future__ import annotations

import os
import subprocess
import tempfile

import numpy as np

from rf_runtime.errors import InputError, OutputError, require
from rf_runtime.files import output_folder, temp_file


class Mp4Writer:
    """Write uint8 [T, H, W, 3] frame batches to an H.264 MP4 at ``fps`` through an ffmpeg child process.

    The file appears at ``path`` only after ``close()``, and only when ffmpeg exited 0 and the file reads
    back with every frame written; otherwise ``OutputError`` and nothing at ``path`` (an existing file
    there is left untouched). An exception inside the ``with`` block removes the partial file.

    The MP4 is fragmented (a fragment per second, moov at the front: it streams, and browsers play it),
    so when ffmpeg dies (killed, crashed) ``salvage()`` can keep the frames it had finished.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, quality: int = 8):
        self.path = os.fspath(path)
        if not self.path.lower().endswith(".mp4"):
            raise InputError(f"output {self.path!r} must end in .mp4")
        output_folder(self.path, "the video")
        self.fps, self.quality = fps, quality
        fd, self.tmp_path = temp_file(
            self.path, "the video", suffix=".mp4"
        )  # ffmpeg picks the container from it
        os.close(fd)
        self._proc = None
        self._log = None
        self._size = None
        self.frames_written = 0

    def _start(self, w: int, h: int) -> None:
        ffmpeg = require("imageio_ffmpeg", "video")
        crf = int((1 - self.quality / 10.0) * 51)
        cmd = [
            ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-vcodec",
            "rawvideo",
            "-s",
            f"{w}x{h}",
            "-pix_fmt",
            "rgb24",
            "-r",
            str(self.fps),
            "-i",
            "-",
            "-an",
            "-vcodec",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            str(crf),
            "-movflags",
            "+frag_keyframe+empty_moov+default_base_moof",
            "-frag_duration",
            "1000000",
            "-flush_packets",
            "1",
            self.tmp_path,
        ]
        self._log = tempfile.TemporaryFile(
            dir=os.path.dirname(os.path.abspath(self.path))
        )  # ffmpeg's messages
        # its own session: a Ctrl-C meant for us does not kill the encoder, so the frames so far can be saved
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True
        )
        self._size = (h, w)

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if self._proc is None:
            self._start(frames.shape[2], frames.shape[1])
        elif tuple(frames.shape[1:3]) != self._size:
            raise InputError(
                f"frames of size {list(frames.shape[1:3])} after frames of size {list(self._size)}: "
                "one video has one size"
            )
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).data)
        except OSError as exc:  # BrokenPipeError: ffmpeg is gone
            raise self._failure(
                f"the video encoder (ffmpeg) stopped after {self.frames_written} frames "
                f"({type(exc).__name__})"
            ) from None
        self.frames_written += len(frames)

    def _failure(self, what: str) -> OutputError:
        rc = self._finish()
        detail = f"exit status {rc}" if rc is None or rc >= 0 else f"killed by signal {-rc}"
        last = self._last_log_line()
        return OutputError(f"{what}: {detail}{': ' + last if last else ''}")

    def _finish(self) -> int | None:
        """Close ffmpeg's input, wait for it to end; its exit status."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        return self._proc.wait()

    def _last_log_line(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""

    def close(self) -> None:
        if self._proc is None:
            self.abort()
            raise InputError("no frames were written: nothing to save")
        rc = self._finish()
        if rc != 0:
            err = self._failure(f"the video encoder (ffmpeg) failed; nothing was written to {self.path}")
            self.abort()
            raise err
        got = count_frames(self.tmp_path)
        if got != self.frames_written:
            self.abort()
            raise OutputError(
                f"the encoded video reads back with {got} frames, {self.frames_written} were written "
                f"(a full disk?): nothing was written to {self.path}"
            )
        os.replace(self.tmp_path, self.path)
        self._close_log()

    def salvage(self) -> int:
        """After the encoder died (killed by a signal): keep the fragments it had finished at ``path`` when they
        read back as video. Returns the frames kept; 0 when nothing is readable or ffmpeg stopped on an error
        of its own (a full disk: its file is not trusted), and then the partial file is removed."""
        rc = self._finish() if self._proc is not None else None
        killed = rc is not None and rc < 0
        got = count_frames(self.tmp_path) if killed and os.path.exists(self.tmp_path) else 0
        if got > 0:
            os.replace(self.tmp_path, self.path)
            self._close_log()
            return got
        self.abort()
        return 0

    def abort(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._finish()
            self._proc = None
        self._close_log()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def count_frames(path: str | os.PathLike) -> int:
    """The number of video frames an MP4 reads back with (0 when it is not a readable video)."""
    ffmpeg = require("imageio_ffmpeg", "video")
    try:
        return int(ffmpeg.count_frames_and_secs(os.fspath(path))[0])
    except Exception:  # imageio-ffmpeg raises RuntimeError / IOError for an unreadable file
        return 0


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Read an MP4 back as uint8 [T, H, W, 3] (for tests and evaluation)."""
    ffmpeg = require("imageio_ffmpeg", "video")
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.isfile(path):
        raise InputError(
            f"video {path} {'is a directory' if os.path.isdir(path) else 'does not exist'}: pass an MP4 file"
        )
    try:
        reader = ffmpeg.read_frames(path)
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    except Exception as exc:  # imageio-ffmpeg: RuntimeError / IOError / StopIteration with ffmpeg's log
        raise InputError(f"{path} is not a readable video ({type(exc).__name__}): pass an MP4 file") from None
    if not frames:
        raise InputError(f"{path} holds no video frames: pass an MP4 file")
    return np.stack(frames)
