"""rf-generate end to end: MP4 output, atomic writes, clear errors."""

import os

import numpy as np
import pytest

from rf_runtime.cli import generate_main
from rf_runtime.video import Mp4Writer, read_mp4
from rf_runtime.testing import HEIGHT, WIDTH


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir)


def test_generate_writes_mp4(model_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc = generate_main(
        [
            "--model-dir",
            model_dir,
            "--prompt",
            "a red circle bouncing",
            "--seconds",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    frames = read_mp4(out)
    assert frames.shape == (32, HEIGHT, WIDTH, 3)  # 2 s at 16 fps
    assert "wrote" in capsys.readouterr().out
    assert [p for p in os.listdir(tmp_path) if p != "clip.mp4"] == []  # no temporary left behind


def test_checkpoint_dir_is_taken_as_model_dir(model_dir, tmp_path):
    out = tmp_path / "clip.mp4"
    assert (
        generate_main(
            [
                "--checkpoint",
                model_dir,
                "--prompt",
                "a cube",
                "--seconds",
                "0.5",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert read_mp4(out).shape[0] == 8


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "  "], "prompt is empty"),
        (["--prompt", "a cube", "--seconds", "0"], "--seconds"),
        (["--prompt", "a cube", "--out", "/nonexistent-dir/x.mp4"], "does not exist"),
        (["--prompt", "a cube", "--out", "clip.avi"], "must end in .mp4"),
        (["--prompt", "a cube", "--height", "0"], "must be positive multiples"),  # was taken as 'the default'
    ],
)
def test_bad_arguments_exit_2_with_message(model_dir, tmp_path, capsys, args, message):
    argv = ["--model-dir", model_dir, "--out", str(tmp_path / "c.mp4"), "--quiet"] + args
    assert generate_main(argv) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_missing_model_dir(tmp_path, capsys):
    assert (
        generate_main(
            [
                "--model-dir",
                str(tmp_path / "nope"),
                "--prompt",
                "a cube",
                "--out",
                str(tmp_path / "c.mp4"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_failure_mid_stream_leaves_no_partial_file(tmp_path):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous video")
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(RuntimeError):
        with Mp4Writer(out) as writer:
            writer.write(frames)
            raise RuntimeError("generation failed")
    assert out.read_bytes() == b"previous video"  # the old file is untouched
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_ema_alpha_option_is_validated(model_dir, tmp_path, capsys):
    argv = ["--model-dir", model_dir, "--prompt", "a cube", "--out", str(tmp_path / "c.mp4"), "--quiet"]
    assert generate_main(argv + ["--ema-alpha", "1.5"]) == 2
    assert "ema_alpha" in capsys.readouterr().err


def test_tiny_model_command_takes_help_and_refuses_option_like_dirs(tmp_path, monkeypatch, capsys):
    """`python -m rf_runtime.testing --help` once wrote a model directory named '--help'."""
    from rf_runtime.testing import main

    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0 and "OUTPUT_DIR" in capsys.readouterr().out
    assert main(["--out"]) == 2 and main([]) == 2 and main(["a", "b"]) == 2
    assert os.listdir(tmp_path) == []
    assert main(["tiny"]) == 0 and sorted(os.listdir(tmp_path / "tiny")) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "rf_runtime.json",
        "vae.safetensors",
    ]


def test_tiny_model_command_reads_its_options(tmp_path, monkeypatch, capsys):
    """`--preset X` was read as an option named X with the value '--preset' (Python evaluates the right
    side of `options[args.pop(0)] = args.pop(0)` first), so every preset and device was ignored:
    device_check.sh's `--preset wan2.1-1.3b --device cuda` wrote the tiny model."""
    from rf_runtime import testing

    monkeypatch.chdir(tmp_path)
    assert testing.main(["--preset", "huge", "m"]) == 2 and os.listdir(tmp_path) == []
    asked = []
    monkeypatch.setattr(testing, "write_wan_random_dir", lambda path, device: asked.append((path, device)))
    assert testing.main(["--preset", "wan2.1-1.3b", "--device", "cuda", "w"]) == 0
    assert asked == [("w", "cuda")]


def test_sigterm_is_handled_like_ctrl_c(model_dir, tmp_path, monkeypatch, capsys):
    """kill / docker stop mid-video: the frames made so far are saved and no temporary file is left
    (Python's default SIGTERM action exits without cleanup and left a hidden .rf-*.mp4 behind)."""
    import signal

    real_write = Mp4Writer.write

    def write_then_terminated(self, frames):
        real_write(self, frames)
        os.kill(os.getpid(), signal.SIGTERM)  # as an operator's kill would, after the first chunk

    monkeypatch.setattr(Mp4Writer, "write", write_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "clip.mp4"
    assert (
        generate_main(
            ["--model-dir", model_dir, "--prompt", "a cube", "--seconds", "3", "--out", str(out), "--quiet"]
        )
        == 130
    )
    assert read_mp4(out).shape[0] == 9  # chunk 0's frames
    assert os.listdir(tmp_path) == ["clip.mp4"]
    assert "interrupted: saved the 9 frames" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the command restores the caller's handler


def test_run_command_reports_an_interrupt_in_one_line(capsys):
    """A command without its own Ctrl-C path (rf-export, rf-bench): exit 130 and one line, no traceback."""
    from rf_runtime.cli import run_command

    def body(args):
        raise KeyboardInterrupt

    assert run_command("rf-export", body, None) == 130
    assert capsys.readouterr().err.strip() == "rf-export: interrupted"
