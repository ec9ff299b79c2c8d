"""Step-wise Sampling on a tiny random SD3.5-style pipeline: exactness against diffusers, the reuse of the DRM's
prefix activations, the top-1 selection, and the command line."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import model
import step_sample
from tiny_pipeline import TINY_TRANSFORMER, build_tiny_pipeline, save_tiny_pipeline

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=3)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return model.load_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def drm_file(pipe, tmp_path_factory):
    drm = model.DRM(pipe.transformer, skip_last_blocks=1, train_output_layers=True)
    for p in drm.reward_output.parameters():  # a head whose scores vary across candidates
        p.data.normal_(0, 0.2)
    path = str(tmp_path_factory.mktemp("drm") / "drm.safetensors")
    model.save_drm(drm, path, max_sequence_length=16)
    return path


def test_select_best_takes_the_argmax_of_each_row():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    candidates, scores = torch.randn(5, 4, 3, 2, 2, generator=g), torch.randn(5, 4, generator=g)
    chosen, best = step_sample.select_best(candidates, scores)
    for row in range(5):
        j = int(scores[row].argmax())
        assert torch.equal(chosen[row], candidates[row, j]) and best[row] == scores[row].max()


def test_sde_candidates_share_one_mean():
    x, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    eps = torch.randn(6, 16, 4, 4)
    cand = step_sample.sde_candidates(v, x, 0.6, 0.5, 0.7, eps)
    _, _, mean, std = model.sde_step(v, x, 0.6, 0.5, 0.7, x_next=x)
    assert cand.shape == (6, 16, 4, 4)
    torch.testing.assert_close(cand[:3], mean[:1] + std[:1] * eps[:3])
    euler = x + (0.5 - 0.6) * v  # noise level 0: every candidate is the Euler step
    torch.testing.assert_close(step_sample.sde_candidates(v, x, 0.6, 0.5, 0.0, eps), euler.repeat_interleave(3, 0))


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_k1_ode_equals_diffusers_pipeline(tiny_dir, pipe, guidance):
    seed = int(np.random.default_rng().integers(10_000))
    prompts = ["a red circle", "a blue square left of a green triangle"]
    ours, _ = step_sample.step_sample(pipe, None, prompts, [seed, seed + 1], k=1, steps=6, guidance=guidance,
                                      noise_level=0.0, height=32, width=32, max_sequence_length=16)
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt=prompts, num_inference_steps=6, guidance_scale=guidance, height=32, width=32,
                       generator=[torch.Generator().manual_seed(s) for s in (seed, seed + 1)],
                       max_sequence_length=16, output_type="pt").images  # [0, 1]
    assert (((ours + 1) / 2) - theirs).abs().max() <= 1 / 255


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_reused_prefix_activations_give_the_same_images(pipe, drm_file, guidance):
    drm, _ = model.load_drm(drm_file, pipe.transformer)
    assert drm.transformer is pipe.transformer
    seed = int(np.random.default_rng().integers(10_000))
    args = (pipe, drm, ["a red circle", "a yellow square"], [seed, seed + 5])
    kw = dict(k=3, steps=5, guidance=guidance, noise_level=0.7, height=32, width=32, max_sequence_length=16)
    with_reuse, hist_a = step_sample.step_sample(*args, **kw, reuse=True)
    without, hist_b = step_sample.step_sample(*args, **kw, reuse=False)
    torch.testing.assert_close(with_reuse, without, atol=1e-5, rtol=0)
    assert np.allclose(hist_a, hist_b, atol=1e-4) and len(hist_a[0]) == 5


def test_velocity_from_cache_equals_full_forward(pipe, drm_file):
    drm, _ = model.load_drm(drm_file, pipe.transformer)
    x = torch.randn(2, 16, 32, 32)
    embeds, pooled = model.encode_prompts(pipe, ["a red circle", "a blue circle"], 16)
    t = torch.full((2,), 437.0)
    with torch.no_grad():
        full = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]
        hidden, temb, context = drm.prefix(x, t, embeds, pooled, return_context=True)
        resumed = model.transformer_suffix(pipe.transformer, hidden, context, temb, drm.prefix_blocks, 32, 32)
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)


def test_selection_keeps_the_best_candidate(pipe, drm_file):
    """Branching only at the last step: the trajectories agree until then, the k = 1 result is candidate 0 of
    the k = 6 draw, so the chosen final latent scores at least as high, and higher on average."""
    drm, _ = model.load_drm(drm_file, pipe.transformer)
    seed = int(np.random.default_rng().integers(10_000))
    prompts, seeds = ["a red circle"] * 6, list(range(seed, seed + 6))
    kw = dict(steps=4, guidance=1.0, noise_level=0.9, height=32, width=32, max_sequence_length=16,
              branch_steps=(3, 4), return_latents=True)
    _, _, plain = step_sample.step_sample(pipe, drm, prompts, seeds, k=1, **kw)
    _, history, chosen = step_sample.step_sample(pipe, drm, prompts, seeds, k=6, **kw)
    embeds, pooled = model.encode_prompts(pipe, prompts, 16)
    with torch.no_grad():
        s_plain = drm(plain, torch.zeros(6), embeds, pooled)
        s_chosen = drm(chosen, torch.zeros(6), embeds, pooled)
    assert torch.all(s_chosen >= s_plain - 1e-5) and s_chosen.mean() > s_plain.mean()
    np.testing.assert_allclose([h[-1] for h in history], s_chosen.numpy(), atol=1e-4)


def run_cli(*args):
    result = subprocess.run([sys.executable, "step_sample.py", *args], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=240)
    return result.returncode, result.stdout + result.stderr


def test_cli_writes_images_results_and_grid(tiny_dir, drm_file, tmp_path):
    rc, log = run_cli("--model", tiny_dir, "--drm", drm_file, "--prompt", "a red circle", "--prompt",
                      "a blue square", "--k", "2", "--steps", "3", "--height", "32", "--width", "32", "--grid",
                      "--branch-steps", "1:3", "--out", str(tmp_path))
    assert rc == 0, log[-2000:]
    rows = [__import__("json").loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [r["prompt"] for r in rows] == ["a red circle", "a blue square"]
    assert all(len(r["step_scores"]) == 2 and isinstance(r["drm_score"], float) for r in rows)
    assert (tmp_path / "grid.png").exists() and (tmp_path / "k_00000.png").exists()
    rc, log = run_cli("--model", tiny_dir, "--drm", drm_file, "--prompt", "a red circle", "--best-of-n", "2",
                      "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "bon"))
    assert rc == 0, log[-2000:]


def test_cli_bad_input(tiny_dir, drm_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    other = build_tiny_pipeline(seed=1, transformer_config=dict(TINY_TRANSFORMER, caption_projection_dim=48))
    other_drm = str(tmp_path / "other.safetensors")
    model.save_drm(model.DRM(other.transformer, skip_last_blocks=1), other_drm)
    base = ["--model", tiny_dir, "--drm", drm_file, "--prompt", "a red circle", "--height", "32", "--width", "32"]
    cases = [(["--k", "0"], "--k"), (["--steps", "0"], "--steps"), (["--height", "30"], "--height"),
             (["--prompts", str(empty)], "empty.txt"), (["--branch-steps", "3:2"], "--branch-steps")]
    for extra, expected in cases:
        rc, log = run_cli(*base, *extra, "--out", str(tmp_path / "o"))
        assert rc != 0 and "error:" in log and expected in log, (extra, log[-1000:])
    rc, log = run_cli("--model", str(tmp_path / "missing"), "--prompt", "x", "--k", "1")
    assert rc != 0 and "missing" in log
    rc, log = run_cli("--model", tiny_dir, "--prompt", "x", "--k", "2")
    assert rc != 0 and "--drm" in log
    rc, log = run_cli("--model", tiny_dir, "--drm", other_drm, "--prompt", "x", "--k", "2", "--height", "32",
                      "--width", "32")
    assert rc != 0 and "other.safetensors" in log, log[-1000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_give_the_eager_results(tiny_dir, drm_file):
    seed = int(torch.randint(0, 10_000, ()))
    from torch._dynamo.utils import counters
    eager, compiled = model.load_pipeline(tiny_dir), model.load_pipeline(tiny_dir)
    model.compile_blocks(compiled.transformer)
    graphs_before = counters["stats"]["unique_graphs"]
    drm_eager, _ = model.load_drm(drm_file, eager.transformer)
    drm_compiled, _ = model.load_drm(drm_file, compiled.transformer)
    prompts, seeds = ["a red circle", "a blue square"], [seed, seed + 1]
    for k, noise in ((1, 0.0), (2, 0.7)):  # plain ODE sampling; branching with the DRM and the prefix reuse
        kw = dict(k=k, steps=3, guidance=4.5, noise_level=noise, height=32, width=32, max_sequence_length=16,
                  return_latents=True)
        images_e, scores_e, latents_e = step_sample.step_sample(eager, drm_eager if k > 1 else None, prompts,
                                                                seeds, **kw)
        images_c, scores_c, latents_c = step_sample.step_sample(compiled, drm_compiled if k > 1 else None,
                                                                prompts, seeds, **kw)
        torch.testing.assert_close(latents_c, latents_e, atol=1e-4, rtol=0)
        torch.testing.assert_close(images_c, images_e, atol=1e-4, rtol=0)
        if k > 1:
            torch.testing.assert_close(torch.as_tensor(scores_c), torch.as_tensor(scores_e), atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the blocks did run compiled
