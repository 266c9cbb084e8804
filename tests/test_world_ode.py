"""The ODE initialisation of the causal student (CausVid's, which Self Forcing's DMD starts from): the
teacher's ODE pairs at the stream sampler's noise levels, and the causal regression on them (TINY config)."""

import numpy as np
import pytest
import torch

from rf_runtime.errors import InputError
from rf_runtime.world import training as T

CFG = T.TINY
SHAPE = (CFG.latent_frames, CFG.dit.in_dim, *CFG.latent_hw)


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    torch.manual_seed(3)
    return T.CausalDiT(CFG.dit).eval()


def test_teacher_ode_records_the_euler_path_at_the_sampler_levels_by_hand(teacher):
    # 4 Euler steps over the shifted grid 1, 0.9375, 0.8333, 0.625, 0 are exactly the sampler's levels
    # (SPEC 2: timesteps 1000, 750, 500, 250 warped with shift 5), so the path is recorded with no insertion
    text = torch.from_numpy(CFG.text.encode(["a red circle bouncing"]))
    levels = [1.0, 0.9375, 2.5 / 3.0, 0.625]
    x = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(11))
    expect = []
    with torch.no_grad():
        for a, c in zip(levels, [*levels[1:], 0.0]):
            expect.append(x.clone())
            t = torch.full((1, SHAPE[0]), a * 1000.0)
            v_c = teacher.forward_full(x, t, text)
            v_u = teacher.forward_full(x, t, torch.zeros_like(text))
            x = x + (c - a) * (v_c + 1.5 * (v_c - v_u))
    end, path = T.teacher_ode(teacher, text, SHAPE, steps=4, guidance=1.5, seed=11, record=tuple(levels))
    torch.testing.assert_close(end, x, rtol=1e-5, atol=1e-5)
    assert len(path) == 4
    for got, want in zip(path, expect):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # recording never changes the sample when the grid already holds the levels
    torch.testing.assert_close(T.sample_teacher(teacher, text, SHAPE, steps=4, guidance=1.5, seed=11), end)


def test_a_level_missing_from_the_grid_is_inserted_as_an_extra_euler_step(teacher):
    text = torch.from_numpy(CFG.text.encode(["a blue square moving left"]))
    x = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = torch.full((1, SHAPE[0]), 1000.0)
        x_half = x + (0.5 - 1.0) * teacher.forward_full(x, t, text)
        end = x_half + (0.0 - 0.5) * teacher.forward_full(x_half, torch.full((1, SHAPE[0]), 500.0), text)
    got_end, (got_half,) = T.teacher_ode(teacher, text, SHAPE, steps=1, shift=5.0, seed=2, record=(0.5,))
    torch.testing.assert_close(got_half, x_half, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_end, end, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="noise levels"):
        T.teacher_ode(teacher, text, SHAPE, steps=1, record=(0.0,))
    for clips, steps in ((0, 4), (2, 0)):
        with pytest.raises(InputError, match="--clips >= 1 and --steps >= 1"):
            T.teacher_ode_pairs(teacher, CFG, ["a red circle bouncing"], clips, steps=steps)


def test_ode_pairs_cycle_the_prompts_and_round_trip_through_safetensors(teacher, tmp_path):
    prompts = ["a red circle bouncing", "a small blue square moving left on a gray background"]
    data = T.teacher_ode_pairs(teacher, CFG, prompts, 5, steps=4, batch=2, seed=7)
    assert data.prompts == [prompts[i % 2] for i in range(5)]
    assert data.latents.shape == (5, *SHAPE)
    assert data.trajectory.shape == (5, 4, *SHAPE)
    np.testing.assert_array_equal(data.text.numpy(), CFG.text.encode(data.prompts))
    # the path starts at the batch's seeded noise (batch 0: seed 7; batch 1: seed 9) and ends at the sample
    torch.testing.assert_close(
        data.trajectory[:2, 0], torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(7))
    )
    torch.testing.assert_close(
        data.trajectory[2:4, 0], torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(9))
    )
    one = T.teacher_ode(teacher, data.text[4:5], SHAPE, steps=4, guidance=1.5, seed=11)[0]
    torch.testing.assert_close(data.latents[4:5], one, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "ode.safetensors")
    data.save(path)
    back = T.LatentData.load(path)
    assert back.prompts == data.prompts
    torch.testing.assert_close(back.trajectory, data.trajectory, rtol=0, atol=0)
    torch.testing.assert_close(back.latents, data.latents, rtol=0, atol=0)


def test_ode_student_loss_chunk0_is_the_x0_regression_of_the_bidirectional_forward_by_hand(teacher):
    # with an empty cache, chunk 0's causal forward is the full forward of those frames alone
    data = T.teacher_ode_pairs(teacher, CFG, ["a red circle bouncing"], 2, steps=4, batch=2)
    c = CFG.stream.chunk_frames
    sched = CFG.stream.schedule()
    _, logs = T.ode_student_loss(
        teacher, data.trajectory, data.latents, data.text, np.random.default_rng(5), CFG.stream
    )
    k = np.random.default_rng(5).integers(4, size=2)  # the loss's first draw: chunk 0's step per sample
    with torch.no_grad():
        errs = []
        for b in range(2):
            x_t = data.trajectory[b : b + 1, k[b], :c]
            v = teacher.forward_full(x_t, torch.full((1, c), sched.t[k[b]]), data.text[b : b + 1])
            errs.append(((x_t - sched.sigma[k[b]] * v - data.latents[b : b + 1, :c]) ** 2).mean())
    np.testing.assert_allclose(logs["loss_chunk0"], float(torch.stack(errs).mean()), rtol=1e-4)
    assert sorted(k for k in logs if k.startswith("loss_chunk")) == [f"loss_chunk{i}" for i in range(4)]


def test_ode_student_fits_a_fixed_set_of_pairs(teacher):
    data = T.teacher_ode_pairs(
        teacher, CFG, ["a red circle bouncing", "a green triangle moving up"], 4, steps=4
    )
    model, history = T.train_student(CFG, data, teacher, steps=60, batch=4, lr=3e-3, objective="ode")
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_the_ode_objective_on_plain_latents_names_the_command_that_makes_pairs(teacher):
    plain = T.LatentData(
        torch.zeros(2, *SHAPE), torch.zeros(2, CFG.dit.text_len, CFG.dit.text_dim), ["x", "y"]
    )
    with pytest.raises(InputError, match="rf-world ode-pairs"):
        T.train_student(CFG, plain, teacher, steps=1, objective="ode")
    wrong = T.LatentData(plain.latents, plain.text, plain.prompts, torch.zeros(2, 3, *SHAPE))
    with pytest.raises(InputError, match="noise levels"):
        T.ode_student_loss(
            teacher, wrong.trajectory, wrong.latents, wrong.text, np.random.default_rng(0), CFG.stream
        )


def test_cli_ode_pairs_then_student_with_the_ode_objective(teacher, tmp_path):
    from rf_runtime.world.cli import main

    teacher_file = str(tmp_path / "t.safetensors")
    T.save_dit(teacher, teacher_file)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle bouncing\na small blue square moving left on a gray background\n")
    run = lambda *a: main(["--quiet", *a, "--tiny"])  # noqa: E731
    ode = str(tmp_path / "ode.safetensors")
    assert (
        run(
            "ode-pairs",
            "--teacher",
            teacher_file,
            "--prompts-file",
            str(prompts),
            "--clips",
            "3",
            "--steps",
            "4",
            "--out",
            ode,
        )
        == 0
    )
    assert T.LatentData.load(ode).trajectory.shape == (3, 4, *SHAPE)

    def student(data, out, steps):
        args = ["--objective", "ode", "--data", data, "--teacher", teacher_file, "--steps", steps]
        return run("student", *args, "--batch", "2", "--out", out)

    out = str(tmp_path / "s.safetensors")
    assert student(ode, out, "2") == 0
    assert T.load_dit(out).config == teacher.config
    # plain latents with the ode objective: a clear error (exit 2), no weights written
    plain = str(tmp_path / "plain.safetensors")
    T.LatentData(torch.zeros(2, *SHAPE), torch.zeros(2, CFG.dit.text_len, CFG.dit.text_dim), ["a", "b"]).save(
        plain
    )
    assert student(plain, str(tmp_path / "bad.safetensors"), "1") != 0
    assert not (tmp_path / "bad.safetensors").exists()
