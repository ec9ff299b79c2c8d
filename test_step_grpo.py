"""Step-GRPO / Flow-GRPO on a tiny random SD3.5-style pipeline: the advantage and loss math, the on-policy check
(ratio 1 at the first update), both modes end to end, the LoRA in diffusers' format, resume, torchrun, bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

import model
import step_grpo
from data import UserError
from tiny_pipeline import TINY_TRANSFORMER, build_tiny_pipeline, save_tiny_pipeline

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
RUN = ["--height", "32", "--width", "32", "--steps", "3", "--max-sequence-length", "16", "--prompts-per-step", "2",
       "--eval-num", "1", "--eval-steps", "2", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--ema", "0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=3)


@pytest.fixture(scope="module")
def drm_file(tiny_dir, tmp_path_factory):
    pipe = model.load_pipeline(tiny_dir)
    drm = model.DRM(pipe.transformer, skip_last_blocks=1, train_output_layers=True)
    for p in drm.reward_output.parameters():  # a head whose scores vary across candidates
        p.data.normal_(0, 0.2)
    path = str(tmp_path_factory.mktemp("drm") / "drm.safetensors")
    model.save_drm(drm, path, max_sequence_length=16)
    return path


def run(args, nproc=0, check=True):
    launcher = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    result = subprocess.run(launcher + [os.path.join(REPO, "step_grpo.py"), *args], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out, base=False):
    """The training rows of OUT/metrics.jsonl (steps 1, 2, ...); with base=True also the step-0 evaluation row."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if base or r["step"] > 0]


# ----------------------------------------------------------------------------------------------------------------
# The math

def test_advantages_within_groups():
    advantages = step_grpo.normalise_in_groups
    assert torch.equal(advantages(torch.full((3, 4), 2.5)), torch.zeros(3, 4))  # equal rewards: no preference
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, -0.5, 0.0, 0.0]])
    adv = advantages(rewards)
    assert adv.shape == rewards.shape
    assert torch.equal(adv > 0, rewards > rewards.mean(1, keepdim=True))  # sign: better than the row's mean
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    expected = (torch.tensor([1.0, 3.0]) - 2.0) / (1.0 + 1e-4)  # population std of (1, 3) is 1
    torch.testing.assert_close(advantages(torch.tensor([[1.0, 3.0]]))[0], expected)


def test_global_std_advantages_and_clamp():
    """Flow-GRPO's advantage: each prompt's own mean, the std of every rank's rewards of the step (numpy's
    population std), then the clamp. An outlier in one group makes |A| > 5, where the clamp binds."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    mine, other = torch.randn(2, 24, generator=g), torch.randn(3, 24, generator=g)  # this rank's, another rank's
    mine[0, 5] = 40.0
    everything = torch.cat([mine, other])
    adv = step_grpo.normalise_by_global_std(mine, everything, eps=1e-4)
    numbers = everything.double().numpy()
    expected = (mine.double().numpy() - mine.double().numpy().mean(1, keepdims=True)) / (numbers.std() + 1e-4)
    np.testing.assert_allclose(adv.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert adv.abs().max() > 5  # the outlier
    clipped = step_grpo.clip_advantages(adv, 5.0)
    assert clipped.abs().max() == 5.0 and torch.equal(clipped[adv.abs() < 5], adv[adv.abs() < 5])
    assert torch.equal(step_grpo.clip_advantages(adv, 0.0), adv)  # 0: off


def test_ppo_clip_loss_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.05])
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    logp_old = torch.tensor([-1.0, 0.3, 2.0, 0.0])
    loss, ratio_dev, clip_frac = step_grpo.ppo_clip_loss(logp_old + ratio.log(), logp_old, adv, clip_eps=0.1)
    # per sample max(-A r, -A clip(r)): max(-1.5, -1.1) = -1.1; max(-0.5, -0.9) = -0.5; 2 * 1; max(1.05, 1.05)
    torch.testing.assert_close(loss, torch.tensor((-1.1 - 0.5 + 2.0 + 1.05) / 4))
    torch.testing.assert_close(ratio_dev, torch.tensor((0.5 + 0.5 + 0.0 + 0.05) / 4))
    assert float(clip_frac) == 0.5


def test_candidate_log_probs_are_the_gaussian_density():
    x, v, k = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), 3
    candidates = torch.randn(6, 16, 4, 4)
    logp, mean, std = step_grpo.candidate_log_probs(v, x, 0.6, 0.45, 0.7, candidates, k)
    _, _, mean_one, std_one = model.sde_step(v, x, 0.6, 0.45, 0.7, x_next=x)
    torch.testing.assert_close(mean, mean_one.repeat_interleave(k, 0))
    density = torch.distributions.Normal(mean_one.repeat_interleave(k, 0), std_one.repeat_interleave(k, 0))
    torch.testing.assert_close(logp, density.log_prob(candidates).mean(dim=(1, 2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# LoRA in diffusers' format

def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 4, 4, generator=g)
    embeds = torch.randn(2, 10, TINY_TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, TINY_TRANSFORMER["pooled_projection_dim"], generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]


def test_saved_lora_loads_in_diffusers_with_its_alpha(tiny_dir, tmp_path):
    pipe = model.load_pipeline(tiny_dir)
    base = transformer_output(pipe.transformer)
    trainable = step_grpo.add_lora(pipe.transformer, rank=4, alpha=16)  # scale alpha / r = 4, not diffusers' 1
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    assert trainable and all(p.requires_grad and p.dtype == torch.float32 for p in trainable)
    trained = transformer_output(pipe.transformer)
    step_grpo.save_lora(pipe.transformer, str(tmp_path / "lora"))
    loaded = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    loaded.load_lora_weights(str(tmp_path / "lora"))
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the output ...
    torch.testing.assert_close(transformer_output(loaded.transformer), trained)  # ... and diffusers reproduces it


def test_frozen_drm_reads_the_base_weights_and_lora_trains(tiny_dir, drm_file):
    pipe = model.load_pipeline(tiny_dir)
    drm, _ = model.load_drm(drm_file, pipe.transformer)  # frozen mode: requires_grad_(False) on the transformer
    x, t = torch.randn(2, 16, 4, 4), torch.tensor([500.0, 500.0])
    embeds, pooled = torch.randn(2, 10, TINY_TRANSFORMER["joint_attention_dim"]), torch.randn(2, 96)
    before = drm(x, t, embeds, pooled)
    trainable = step_grpo.add_lora(pipe.transformer, rank=4, alpha=8)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    assert (drm(x, t, embeds, pooled) - before).abs().max() > 1e-4  # the LoRA reaches the shared prefix
    ctx = dict(transformer=pipe.transformer, drm=drm, dtype=torch.float32, autocast=lambda: torch.autocast(
        "cpu", enabled=False))
    torch.testing.assert_close(step_grpo.drm_scores(x, 500.0, embeds, pooled, ctx), before)
    assert all(p.requires_grad for p in trainable)  # enable_adapters() after scoring keeps them trainable
    v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                         return_dict=False)[0]
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)  # every LoRA matrix gets a gradient


def test_oracle_reward_scores_the_base_models_clean_prediction(tiny_dir, monkeypatch):
    pipe = model.load_pipeline(tiny_dir)
    trainable = step_grpo.add_lora(pipe.transformer, rank=4, alpha=8)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    x = torch.randn(3, 16, 4, 4, generator=g)
    embeds = torch.randn(3, 10, TINY_TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(3, 96, generator=g)
    sigma = float(torch.rand((), generator=g)) * 0.8 + 0.1
    with torch.no_grad():
        v_lora = pipe.transformer(hidden_states=x, timestep=torch.full((3,), 1000 * sigma),
                                  encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        pipe.transformer.disable_adapters()
        v_base = pipe.transformer(hidden_states=x, timestep=torch.full((3,), 1000 * sigma),
                                  encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        pipe.transformer.enable_adapters()
    assert (v_lora - v_base).abs().max() > 1e-4  # the LoRA changes the policy ...
    seen = []
    monkeypatch.setattr(step_grpo, "oracle_scores", lambda vae, latents, prompts: seen.append(latents) or
                        latents.flatten(1).mean(1))
    ctx = dict(transformer=pipe.transformer, pipe=pipe, dtype=torch.float32, args=type("A", (), {"reward": "oracle"}),
               autocast=lambda: torch.autocast("cpu", enabled=False))
    step_grpo.rewards_of(x, 1000 * sigma, ["a red circle"] * 3, embeds, pooled, ctx)
    torch.testing.assert_close(seen[-1], x - sigma * v_base)  # ... the oracle scores the base model's prediction
    step_grpo.rewards_of(x, 0.0, ["a red circle"] * 3, embeds, pooled, ctx)
    torch.testing.assert_close(seen[-1], x)  # a clean latent is scored as it is
    assert all(p.requires_grad for p in trainable)


def test_step_mode_with_the_dense_oracle(tiny_dir, tmp_path):
    out = str(tmp_path / "step_oracle")
    run(["--model", tiny_dir, "--reward", "oracle", "--mode", "step", "--k", "3", "--continue", "best", "--max-steps",
         "1", "--out", out, *RUN])
    rows = metrics(out)
    assert rows[0]["ratio_dev"] < 1e-4 and 0 <= rows[0]["reward"] <= rows[0]["reward_chosen"] <= 1
    assert "eval_oracle" in rows[-1]


# ----------------------------------------------------------------------------------------------------------------
# End to end

@pytest.fixture(scope="module")
def step_run(tiny_dir, drm_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("step"))
    run(["--model", tiny_dir, "--drm", drm_file, "--mode", "step", "--k", "2", "--max-steps", "2",
         "--save-every", "1", "--out", out, *RUN])
    return out


def test_step_mode_run_is_on_policy_and_trains(step_run, tiny_dir):
    rows = metrics(step_run)
    assert [r["step"] for r in rows] == [1, 2] and "eval_drm" in rows[-1] and "eval_oracle" in rows[-1]
    base = metrics(step_run, base=True)[0]  # the base model, evaluated before the first update, as the others are
    assert base["step"] == 0 and base["device_seconds"] == 0 and "reward" not in base
    assert base["eval_prompts"] == rows[-1]["eval_prompts"] and 0 <= base["eval_oracle"] <= 1
    assert base["eval_drm"] != rows[-1]["eval_drm"]  # two updates at lr 1e-2 change the samples
    for row in rows:  # the first update's ratio is 1: rollout and update compute the same log-probs (fp32)
        assert row["ratio_dev"] < 1e-4 and row["clip_frac"] == 0 and math.isfinite(row["loss"])
    lora = load_file(os.path.join(step_run, "lora", "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero: it trained
    # The diffusers file and the checkpoint's LoRA are the same adapter: load each, compare the outputs.
    checkpoint = torch.load(os.path.join(step_run, "checkpoint.pt"), weights_only=False)
    pipe = model.load_pipeline(tiny_dir)
    step_grpo.add_lora(pipe.transformer, rank=4, alpha=8)
    from peft.utils import set_peft_model_state_dict
    set_peft_model_state_dict(pipe.transformer, checkpoint["lora"])
    loaded = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    loaded.load_lora_weights(os.path.join(step_run, "lora"))
    torch.testing.assert_close(transformer_output(loaded.transformer), transformer_output(pipe.transformer))
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 1
    with Image.open(os.path.join(step_run, "reward.png")) as png:  # the plot of the evaluations, refreshed at each
        assert png.format == "PNG" and png.size[0] > 400
    # Each evaluation's first samples (one eval prompt, 32 px, in a 72 px captioned cell): same prompt and noise,
    # other weights after the updates.
    names = sorted(os.listdir(os.path.join(step_run, "samples")))
    assert names == [f"step_{s:06d}.png" for s in [0] + [r["step"] for r in rows if "eval_drm" in r]]
    before, after = (np.asarray(Image.open(os.path.join(step_run, "samples", n))) for n in (names[0], names[-1]))
    assert before.shape == after.shape == (32 + 12, 72, 3) and not np.array_equal(before, after)


def test_max_minutes_stops_evaluates_and_saves(tiny_dir, drm_file, tmp_path):
    out = str(tmp_path / "timed")
    result = run(["--model", tiny_dir, "--drm", drm_file, "--mode", "step", "--k", "2", "--max-steps", "1000",
                  "--eval-every", "0", "--save-every", "1000", "--max-minutes", "0.0001", "--out", out, *RUN])
    rows = metrics(out)
    assert len(rows) == 1 and "eval_drm" in rows[0]  # stopped after its first step, evaluated as the last one
    assert "--max-minutes 0.0001: stopped at step 1 of 1000" in result.stderr + result.stdout
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 1


def test_max_minutes_counts_training_not_evaluations(tiny_dir, tmp_path, monkeypatch):
    """--max-minutes is training time: a slow evaluation after every step does not shorten the run. The run stops
    at the first step whose training seconds (the rows' "seconds", summed) pass the budget, though the evaluations'
    sleeps alone pass it after two steps."""
    evaluate = step_grpo.evaluate
    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(step_grpo, "evaluate", slow_evaluate)
    monkeypatch.setattr(step_grpo, "oracle_scores", lambda vae, latents, prompts: latents[:, 0].flatten(1).mean(1))
    out, budget = str(tmp_path / "budget"), 1.0 + float(torch.rand(())) / 2  # seconds
    step_grpo.main(step_grpo.parse_args([
        "--model", tiny_dir, "--reward", "oracle", "--mode", "grpo", "--group", "2", "--max-steps", "1000",
        "--eval-every", "1", "--save-every", "1000", "--max-minutes", str(budget / 60), "--out", out, *RUN]))
    seconds = [row["seconds"] for row in metrics(out)]
    assert sum(seconds[:-1]) <= budget + 0.01 and sum(seconds) > budget - 0.01, (budget, seconds)
    assert 0.5 * len(seconds) > budget  # the sleeps alone: a wall-clock budget would have stopped earlier


def test_samples_png_spreads_over_the_first_batch(tiny_dir, tmp_path, monkeypatch):
    """The evaluation's PNG shows up to 8 samples evenly spaced in its first batch (the toy prompt list runs from
    one object to two), each with its own scores: the oracle stand-in scores a sample by its place in the batch."""
    import step_sample
    shown = []
    monkeypatch.setattr(step_sample, "save_grid", lambda rows, path: shown.append([cell[2] for cell in rows[0]]))
    monkeypatch.setattr(step_grpo, "oracle_scores", lambda vae, latents, prompts: torch.arange(len(prompts)) + 0.0)
    n = int(torch.randint(16, 41, ()))  # >= 16: the spread differs from the first 8
    step_grpo.main(step_grpo.parse_args([
        "--model", tiny_dir, "--reward", "oracle", "--mode", "grpo", "--group", "2", "--max-steps", "1",
        "--eval-every", "0", "--out", str(tmp_path / "spread"), *RUN, "--eval-num", str(n), "--eval-batch-size",
        str(n)]))  # later flags win
    expected = [float(i) for i in range(0, n, n // 8)][:8]
    assert len(shown) == 2 and all([float(v) for v in cells] == expected for cells in shown), (n, shown)


def test_ema_update_and_swap():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g)) for _ in range(2)]
    ema = [torch.randn(3, 4, generator=g) for _ in range(2)]
    expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(ema, params)]
    step_grpo.ema_update(ema, params, 0.9)
    for e, x in zip(ema, expected):
        torch.testing.assert_close(e, x)
    own = [p.detach().clone() for p in params]
    with step_grpo.swapped_in(params, ema):
        assert all(torch.equal(p, e) for p, e in zip(params, ema))
    assert all(torch.equal(p, o) for p, o in zip(params, own))  # their own values again


def test_ema_run_saves_the_ema_lora(tiny_dir, drm_file, tmp_path):
    out = str(tmp_path / "ema")
    run([*RUN, "--model", tiny_dir, "--drm", drm_file, "--mode", "step", "--k", "2", "--max-steps", "2", "--ema", "0.5",
         "--ema-every", "1", "--out", out])  # later flags win
    checkpoint = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    saved = list(load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors")).values())
    raw = list(checkpoint["lora"].values())
    assert len(checkpoint["ema"]) == len(raw) == len(saved)
    for e in checkpoint["ema"]:  # every EMA tensor is in the file users load
        assert any(s.shape == e.shape and torch.allclose(s.float(), e, atol=1e-6) for s in saved)
    assert any(not any(s.shape == r.shape and torch.allclose(s.float(), r, atol=1e-6) for s in saved) for r in raw)
    result = run([*RUN, "--model", tiny_dir, "--drm", drm_file, "--ema", "1.5", "--out", out], check=False)
    assert result.returncode == 2 and "--ema 1.5" in result.stderr


def test_plot_draws_each_run_where_its_values_are(tmp_path):
    import numpy as np
    from plot import COLOURS, plot_runs
    rng = np.random.default_rng()
    low = [dict(step=s, device_seconds=2.0 * s, eval_oracle=float(v)) for s, v in
           enumerate(rng.uniform(0.0, 0.3, 6), 1)]
    high = [dict(step=s, device_seconds=3.0 * s, eval_oracle=float(v)) for s, v in
            enumerate(rng.uniform(0.7, 1.0, 6), 1)]
    path = str(tmp_path / "plot.png")
    plot_runs([("low", low), ("high", high)], "eval_oracle", path)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    panel = pixels[:330]  # above the legend

    def rows_of(colour):
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        return np.nonzero((np.abs(panel - rgb).sum(-1) < 30))[0]

    low_rows, high_rows = rows_of(COLOURS[0]), rows_of(COLOURS[1])
    assert len(low_rows) > 50 and len(high_rows) > 50
    assert high_rows.mean() < low_rows.mean() - 60  # higher values are drawn higher up


def test_grpo_mode_with_oracle_cfg_and_kl(tiny_dir, tmp_path):
    out = str(tmp_path / "grpo")
    run(["--model", tiny_dir, "--reward", "oracle", "--mode", "grpo", "--group", "2", "--cfg-in-loss",
         "--guidance", "3", "--kl-beta", "0.1", "--max-steps", "2", "--out", out, *RUN])
    rows = metrics(out)
    assert len(rows) == 2 and all(r["ratio_dev"] < 1e-4 for r in rows) and "eval_oracle" in rows[-1]
    assert all(0 <= r["reward"] <= 1 for r in rows)  # the oracle's range
    assert os.path.isfile(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("mode", ["step", "grpo"])
def test_training_raises_a_learnable_reward(tiny_dir, tmp_path, monkeypatch, mode):
    """The direction of the whole update (advantages, log-probs, PPO loss, optimizer): with a smooth reward that the
    policy can raise (the mean of the clean latent's first channel, standing in for the oracle), 30 steps lift the
    training reward of the last 10 steps well above that of the first 10, in both modes, from a random seed."""
    monkeypatch.setattr(step_grpo, "oracle_scores", lambda vae, latents, prompts: latents[:, 0].flatten(1).mean(1))
    out = str(tmp_path / mode)
    seed = int(torch.randint(0, 2 ** 31, ()))
    step_grpo.main(step_grpo.parse_args([
        "--model", tiny_dir, "--reward", "oracle", "--mode", mode, "--k", "4", "--group", "4", "--max-steps", "30",
        "--eval-every", "0", "--save-every", "1000", "--seed", str(seed), "--out", out,
        *RUN, "--prompts-per-step", "4"]))  # later flags win
    rewards = [row["reward"] for row in metrics(out)]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.2, (seed, first, last)


def test_resume_gives_the_uninterrupted_weights(step_run, tiny_dir, drm_file, tmp_path):
    out = str(tmp_path / "resumed")
    common = ["--model", tiny_dir, "--drm", drm_file, "--mode", "step", "--k", "2", "--out", out, *RUN]
    run([*common, "--max-steps", "1"])
    os.remove(os.path.join(out, "checkpoint.pt"))  # as if it died before its checkpoint: done again, rows too
    run([*common, "--max-steps", "1", "--resume", "latest"])
    run([*common, "--max-steps", "2", "--resume", "latest"])
    resumed = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    straight = torch.load(os.path.join(step_run, "checkpoint.pt"), weights_only=False)
    assert resumed["step"] == straight["step"] == 2
    for name, tensor in straight["lora"].items():
        torch.testing.assert_close(resumed["lora"][name], tensor, rtol=0, atol=1e-6)
    rows = metrics(out, base=True)
    assert [r["step"] for r in rows] == [0, 1, 2]  # the base evaluated once, the resumed run's rows not repeated
    rows = rows[1:]
    # device_seconds carry on across the resume (one process: each step adds its own seconds)
    assert abs(rows[1]["device_seconds"] - (rows[0]["device_seconds"] + rows[1]["seconds"])) < 0.02
    assert abs(resumed["device_seconds"] - rows[1]["device_seconds"]) < 0.01
    assert abs(resumed["train_seconds"] - resumed["device_seconds"]) < 1e-6  # one rank: the same seconds


def test_prompt_noise_does_not_depend_on_the_split():
    seed, step = int(torch.randint(0, 10_000, ())), int(torch.randint(0, 1000, ()))
    whole = step_grpo.per_prompt_randn(step_grpo.prompt_generators(seed, step, 0, 4, "cpu"), 3, (2, 5), "cpu")
    halves = [step_grpo.per_prompt_randn(step_grpo.prompt_generators(seed, step, first, 2, "cpu"), 3, (2, 5), "cpu")
              for first in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)  # rank 1's prompts = the last two of one
    rows = whole.view(4, -1)
    assert torch.corrcoef(rows).fill_diagonal_(0).abs().max() < 0.9  # each prompt its own noise
    other = step_grpo.per_prompt_randn(step_grpo.prompt_generators(seed, step + 1, 0, 4, "cpu"), 3, (2, 5), "cpu")
    assert not torch.equal(other, whole)  # and fresh noise at the next step


@pytest.mark.parametrize("mode", ["step", "grpo"])
def test_torchrun_two_processes_follow_the_one_process_run(tiny_dir, drm_file, tmp_path, mode):
    """The same global batch and seed on one and two processes: the same samples (noise is seeded per prompt
    position), the same averaged gradients, hence the same curve and weights up to float summation order."""
    common = ["--model", tiny_dir, "--drm", drm_file, "--mode", mode, "--k", "2", "--group", "2", "--max-steps", "2",
              "--continue", "random", *RUN, "--eval-num", "4"]  # later flags win: two evaluation prompts a rank
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([*common, "--out", one])
    run([*common, "--out", two], nproc=2)
    rows_one, rows_two = metrics(one, base=True), metrics(two, base=True)
    assert [r["step"] for r in rows_two] == [0, 1, 2] and all(r["ratio_dev"] < 1e-4 for r in rows_two[1:])
    assert rows_one[1]["reward"] != rows_one[2]["reward"]  # the compared numbers move between steps
    assert rows_one[0]["eval_prompts"] == rows_two[0]["eval_prompts"] == 4
    # Relative agreement: the loss (~1e-5) and the gradient norm (~1e-3) are small, so an absolute tolerance could not
    # fail; the two runs differ only in float summation order (all-reduce of the gradients, the split evaluation).
    for a, b in zip(rows_one, rows_two):  # the base evaluation too: its prompts are split between the ranks
        for key in ("reward", "reward_chosen", "grad_norm", "eval_drm", "eval_oracle"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-9), (key, a[key], b[key])
        if "loss" in a:  # at ratio 1 the loss is -mean(A), 0 up to round-off (~1e-7): only its size is comparable
            assert abs(a["loss"]) < 1e-5 and abs(b["loss"]) < 1e-5
    lora_one = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=False)["lora"]
    checkpoint = torch.load(os.path.join(two, "checkpoint.pt"), weights_only=False)
    assert len(checkpoint["rng"]) == 2
    assert any(v.abs().sum() > 0 for k, v in lora_one.items() if "lora_B" in k)  # it trained (B starts at zero)
    # Adam moves each weight by ~lr = 1e-2 per step whatever the gradient's size, so a gradient element near zero
    # may move differently under another summation order: compare the whole update, and each weight to a step.
    b_one = torch.cat([v.flatten() for k, v in sorted(lora_one.items()) if "lora_B" in k])  # B starts at zero
    b_two = torch.cat([v.flatten() for k, v in sorted(checkpoint["lora"].items()) if "lora_B" in k])
    assert (b_two - b_one).norm() < 0.01 * b_one.norm()
    for name, tensor in lora_one.items():
        torch.testing.assert_close(checkpoint["lora"][name], tensor, rtol=0, atol=3e-3)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear error before any work

@pytest.fixture(scope="module")
def other_drm(tmp_path_factory):
    pipe = build_tiny_pipeline(seed=1, transformer_config=dict(TINY_TRANSFORMER, num_layers=3))
    path = str(tmp_path_factory.mktemp("other") / "drm.safetensors")
    model.save_drm(model.DRM(pipe.transformer, skip_last_blocks=1), path, max_sequence_length=16)
    return path


def test_evaluation_does_not_depend_on_its_batch_size(tiny_dir, drm_file, tmp_path):
    """Each held-out prompt's noise is seeded by its place in the list, so another batching of the evaluation gives
    the same samples and scores (the step-0 row: the base model)."""
    rows = []
    for size in ("1", "2"):
        out = str(tmp_path / f"batch{size}")
        step_grpo.main(step_grpo.parse_args(["--model", tiny_dir, "--drm", drm_file, "--max-steps", "1",
                                             "--eval-every", "0", "--out", out, *RUN, "--eval-num", "3",
                                             "--eval-batch-size", size]))
        rows.append(metrics(out, base=True)[0])
    assert rows[0]["step"] == 0 and rows[0]["eval_prompts"] == rows[1]["eval_prompts"] == 3
    assert rows[0]["eval_drm"] == pytest.approx(rows[1]["eval_drm"], abs=1e-4)
    assert rows[0]["eval_oracle"] == pytest.approx(rows[1]["eval_oracle"], abs=1e-4)


def test_main_gives_the_callers_sigterm_handler_back(tiny_dir, drm_file, tmp_path):
    """main catches SIGTERM while it trains (checkpoint, then exit); called in-process it leaves the caller's handler
    as it found it (a handler left behind made process pools forked later ignore terminate() and hang)."""
    def caller(*_):
        pass
    previous = signal.signal(signal.SIGTERM, caller)
    try:
        step_grpo.main(step_grpo.parse_args(["--model", tiny_dir, "--drm", drm_file, "--max-steps", "1",
                                             "--eval-every", "0", "--out", str(tmp_path / "run"), *RUN]))
        assert signal.getsignal(signal.SIGTERM) is caller
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_bad_inputs(tiny_dir, drm_file, other_drm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    two = tmp_path / "two.txt"
    two.write_text("a red circle\na blue square\n")
    cat = tmp_path / "cat.txt"
    cat.write_text("a photo of a cat\n")
    base = ["--model", tiny_dir, "--drm", drm_file, "--out", str(tmp_path / "bad"), *RUN]
    cases = {
        "no such prompt file": ["--prompts", str(tmp_path / "missing.txt")],
        "holds no prompts": ["--prompts", str(empty)],
        "--k 1": ["--k", "1"],
        "--group 1": ["--mode", "grpo", "--group", "1"],
        "--lora-rank 0": ["--lora-rank", "0"],
        "--guidance 0.5: must be >= 1": ["--guidance", "0.5"],
        "--noise-level 0.0: must be > 0": ["--noise-level", "0"],
        "--eval-batch-size must be >= 1": ["--eval-batch-size", "0"],
        "trained over a transformer with num_layers=3": ["--drm", other_drm],
        "--drm is required": ["--drm", "", "--reward", "drm"],
        "scores toy-world prompts only": ["--reward", "oracle", "--prompts", str(cat)],
    }
    for message, extra in cases.items():
        with pytest.raises(UserError, match=message.replace("-", r"\-")):
            step_grpo.main(step_grpo.parse_args([*base, *extra]))
    args = step_grpo.parse_args([*base, "--prompts", str(two)])
    with pytest.raises(UserError, match="3 ranks but only 2 training prompts"):
        step_grpo.load_prompt_sets(args, world=3)
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")
    result = run([*base, "--k", "1"], check=False)  # the command line: one line, exit 2
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --k 1")


# ----------------------------------------------------------------------------------------------------------------
# toy/compare_grpo.py: the summary's pure functions, bad input, one end-to-end comparison

def synthetic_run(rng, rate, seconds_per_step, eval_every=5):
    """Evaluation rows of a run whose oracle score rises by `rate` a step (and its DRM score twice as fast), stopped
    by a time budget at a random step, with a little evaluation noise; the first row is the base model (step 0)."""
    last = int(rng.integers(40, 60))
    return [dict(step=s, device_seconds=round(s * seconds_per_step, 2), eval_prompts=8,
                 eval_oracle=0.2 + rate * s + float(rng.normal(0, 1e-4)), eval_drm=0.1 + 2 * rate * s)
            for s in [0, *range(eval_every, last, eval_every), last]]


def test_compare_mean_interval():
    import numpy as np
    from toy.compare_grpo import T95, mean_interval
    rng = np.random.default_rng()
    values = [float(v) for v in rng.normal(0.5, 0.1, 3)]
    mean, half = mean_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert half == pytest.approx(T95[2] * np.std(values, ddof=1) / math.sqrt(3))
    assert mean - half < mean < mean + half
    assert 0 < mean_interval(values * 3)[1] < half  # the same spread over more seeds: a narrower interval
    assert mean_interval(values[:1]) == (values[0], None)  # one seed: no interval


def test_compare_speedup_of_a_faster_curve():
    import numpy as np
    from toy.compare_grpo import mean_curve, mean_interval, summarize
    rng = np.random.default_rng()
    rate, seconds = float(rng.uniform(0.002, 0.01)), float(rng.uniform(0.5, 2.0))
    runs = {"grpo": {s: synthetic_run(rng, rate, seconds) for s in range(3)},
            "step_k2_best": {s: synthetic_run(rng, 3 * rate, 1.5 * seconds) for s in range(3)},  # 3x per step
            "step_k4_random": {s: synthetic_run(rng, rate / 3, seconds) for s in range(3)}}
    curve = mean_curve(list(runs["grpo"].values()), "eval_oracle")
    assert curve[-1]["step"] == min(rows[-1]["step"] for rows in runs["grpo"].values())  # the shortest seed's end
    summary = summarize(runs)
    assert summary["target_eval_oracle"] == curve[-1]["eval_oracle"]
    grpo, fast, slow = (summary["configs"][n] for n in ("grpo", "step_k2_best", "step_k4_random"))
    assert grpo["speedup_steps"] == grpo["speedup_seconds"] == 1.0
    assert 2 < fast["speedup_steps"] < 4 and 1.3 < fast["speedup_seconds"] < 2.7  # ~3 and ~2, to the eval grid
    assert slow["speedup_steps"] is None and slow["steps_to_target"] is None  # never gets there
    finals = [rows[-1]["eval_oracle"] for rows in runs["step_k2_best"].values()]
    assert fast["final_eval_oracle"] == pytest.approx(np.mean(finals))
    assert fast["first_eval_drm"] == pytest.approx(0.1) and fast["first_steps"] == [0, 0, 0]  # the base model
    gains = [rows[-1]["eval_oracle"] - rows[0]["eval_oracle"] for rows in runs["step_k2_best"].values()]
    assert (fast["gain_eval_oracle"], fast["gain_eval_oracle_ci95"]) == pytest.approx(mean_interval(gains))
    assert fast["gain_eval_oracle"] == pytest.approx(3 * rate * np.mean([r[-1]["step"] for r in
                                                                          runs["step_k2_best"].values()]), abs=1e-3)
    assert not any(fast["reward_hacking"].values())
    versus = [runs["step_k2_best"][s][-1]["eval_oracle"] - runs["grpo"][s][-1]["eval_oracle"] for s in range(3)]
    assert (fast["final_eval_oracle_vs_baseline"], fast["final_eval_oracle_vs_baseline_ci95"]) == \
        pytest.approx(mean_interval(versus))  # paired by seed
    assert grpo["final_eval_oracle_vs_baseline"] == 0 and grpo["final_eval_oracle_vs_baseline_ci95"] == 0
    assert "final_eval_oracle_vs_baseline" not in summarize({n: runs[n] for n in ("step_k2_best", "step_k4_random")},
                                                            "grpo")["configs"]["step_k2_best"]  # no baseline run
    # Another baseline: its own final score is the target, and it is the one with speed-up 1.
    other = summarize(runs, "step_k2_best")
    assert other["baseline"] == "step_k2_best" and other["configs"]["step_k2_best"]["speedup_steps"] == 1.0
    assert other["target_eval_oracle"] > summary["target_eval_oracle"]  # the faster curve got further
    assert other["configs"]["grpo"]["steps_to_target"] is None
    # A baseline that ends below the base model: its target is met at step 0, so there is nothing to time.
    falling = summarize({"grpo": {s: synthetic_run(rng, -rate, seconds) for s in range(3)},
                         "step_k2_best": runs["step_k2_best"]})
    assert all(e["speedup_steps"] is None and e["speedup_seconds"] is None for e in falling["configs"].values())
    assert falling["configs"]["grpo"]["gain_eval_oracle"] < 0 < falling["configs"]["step_k2_best"]["gain_eval_oracle"]


def test_compare_reward_hacking_flag():
    import numpy as np
    from toy.compare_grpo import reward_hacked
    rng = np.random.default_rng()

    def run(drm_change, oracle_change):
        drm, oracle = float(rng.uniform(-1, 1)), float(rng.uniform(0.3, 0.7))
        return [dict(step=5, eval_drm=drm, eval_oracle=oracle),
                dict(step=10, eval_drm=drm + float(rng.normal()), eval_oracle=float(rng.uniform(0, 1))),
                dict(step=15, eval_drm=drm + drm_change, eval_oracle=oracle + oracle_change)]

    up, down = float(rng.uniform(0.01, 1)), -float(rng.uniform(0.01, 1))
    assert reward_hacked(run(up, -0.02 - float(rng.uniform(0.001, 0.2))))  # the DRM rose, the oracle fell
    assert not reward_hacked(run(up, -float(rng.uniform(0, 0.019))))  # a fall within the noise allowance
    assert not reward_hacked(run(up, float(rng.uniform(0, 0.2))))  # both rose
    assert not reward_hacked(run(down, -0.5))  # both fell: a worse model, not hacking
    assert reward_hacked([{k: v for k, v in r.items() if k != "eval_drm"} for r in run(up, -0.5)]) is None


def test_compare_bad_inputs(drm_file, tmp_path):
    from toy import compare_grpo
    base = ["--drm", drm_file, "--out", str(tmp_path / "compare")]
    cases = {
        "--drm '.*missing.safetensors': no such file": ["--drm", str(tmp_path / "missing.safetensors")],
        "--configs 'grpo,step_k3': unknown configuration step_k3; choose from step_k2_best": ["--configs",
                                                                                              "grpo,step_k3"],
        "--minutes 0.0: must be > 0": ["--minutes", "0"],
        "--minutes -1.0": ["--minutes", "-1"],
        "--seeds '': give one or more": ["--seeds", ""],
        "--seeds '0,a'": ["--seeds", "0,a"],
        "--extra sets --seed=3": ["--extra", "--lr 1e-3 --seed=3"],
        "--baseline 'grpo_oracle': not among --configs grpo,step_k2_best": ["--configs", "grpo,step_k2_best",
                                                                             "--baseline", "grpo_oracle"],
    }
    for message, extra in cases.items():
        with pytest.raises(UserError, match=message.replace("-", r"\-").replace("(", r"\(")):
            compare_grpo.main([*base, *extra])
    # without a DRM only grpo_oracle can run; the message says so
    with pytest.raises(UserError, match="step_k2_best, grpo train on the DRM"):
        compare_grpo.main(["--drm", "", "--configs", "step_k2_best,grpo,grpo_oracle", "--out", str(tmp_path)])
    assert not os.path.exists(tmp_path / "compare")
    result = subprocess.run([sys.executable, "-m", "toy.compare_grpo", *base, "--minutes", "0"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --minutes 0.0: must be > 0 (step_grpo.py reads 0 as no time limit)"]


def test_compare_grpo_end_to_end(tiny_dir, drm_file, tmp_path):
    import shlex
    out = tmp_path / "compare"
    command = [sys.executable, "-m", "toy.compare_grpo", "--drm", drm_file, "--out", str(out), "--minutes", "0.02",
               "--seeds", "0", "--configs", "step_k2_best,grpo", "--group", "2", "--eval-every", "2",
               "--extra", shlex.join(["--model", str(tiny_dir), *RUN])]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert list(summary["configs"]) == ["step_k2_best", "grpo"]
    for name, entry in summary["configs"].items():
        run_rows = metrics(str(out / f"{name}_s0"))
        assert "eval_oracle" in run_rows[-1] and "eval_drm" in run_rows[-1]  # stopped by the budget, evaluated
        assert os.path.isfile(out / f"{name}_s0" / "done.json") and os.path.isfile(out / f"{name}_s0" / "checkpoint.pt")
        assert entry["final_steps"] == [run_rows[-1]["step"]] and entry["final_eval_oracle_ci95"] is None  # 1 seed
        assert entry["final_eval_drm"] == pytest.approx(run_rows[-1]["eval_drm"])
    with Image.open(out / "before_after.png") as grid:  # per configuration: its step-0 and its last samples
        row = Image.open(out / "grpo_s0" / "samples" / "step_000000.png")
        assert grid.size == (170 + row.width, 2 * 2 * row.height)
    grpo = summary["configs"]["grpo"]
    assert grpo["first_steps"] == [0] and summary["configs"]["step_k2_best"]["first_steps"] == [0]  # the base
    # The target is grpo's final score: timed from step 0 unless the base model already met it (a random model).
    assert grpo["speedup_steps"] == (None if summary["target_step"] == 0 else 1.0)
    assert "| step_k2_best | 1 |" in result.stdout and "| grpo | 1 |" in result.stdout
    for png in ("oracle.png", "drm.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 400
    again = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 2  # a rerun resumes: no new runs
    other = subprocess.run([*command, "--minutes", "0.03"], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=60)  # another budget in the same --out would mix two experiments
    assert other.returncode == 2 and "step_k2_best_s0 was run with other flags" in other.stderr


# ----------------------------------------------------------------------------------------------------------------
# Flow-GRPO's SD3 recipe, written out independently

def flow_grpo_gradient(transformer, pipe, prompts, records, rewards, group, guidance, beta, noise_level=0.7):
    """The gradient of Flow-GRPO's loss on one rollout, from their formulas alone (docs: the reference's recipe):
    A = clamp((r - prompt mean) / (std of all rewards + 1e-4), -5, 5); the first int(T * 0.99) steps; the velocity
    v_u.detach() + w (v_c - v_u); the SDE step's mean and Gaussian log-density; PPO-clip (1e-4) on exp(logp -
    logp_old); KL = mean_CHW((mu - mu_ref)^2) / (2 (a sqrt(sigma / (1 - sigma)))^2), sigma_next in the denominator at
    sigma = 1; the loss averaged over the trained steps."""
    r = rewards.double().view(-1, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.flatten().std(unbiased=False) + 1e-4)).clamp(-5, 5).flatten().float()
    pos, neg, pos_pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                          do_classifier_free_guidance=True, max_sequence_length=16)
    rep = lambda t: t.repeat_interleave(group, 0)  # noqa: E731
    embeds, pooled = torch.cat([rep(neg), rep(pos)]), torch.cat([rep(neg_pooled), rep(pos_pooled)])
    trained = records[:int(len(records) * 0.99)]
    params = [p for p in transformer.parameters() if p.requires_grad]

    def step_mean(x, sigma, sigma_next):  # returns mu (B, C, H, W) and the step's std, with the LoRA as it is
        b = len(x)
        out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.full((2 * b,), 1000 * sigma),
                          encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        v_u, v_c = out[:b].detach(), out[b:]
        v = v_u + guidance * (v_c - v_u)
        std_dev_t = noise_level * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
        dt = sigma_next - sigma
        mu = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
        return mu, std_dev_t, std_dev_t * math.sqrt(-dt)

    total = 0.0
    for record in trained:
        x, x_next = record["x"], record["x_next"]
        sigma, sigma_next = float(record["sigma"]), float(record["sigma_next"])
        mu, std_dev_t, std = step_mean(x, sigma, sigma_next)
        logp = (-(x_next - mu) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3))
        ratio = torch.exp(logp - record["logp"])
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
        with torch.no_grad():
            transformer.disable_adapters()
            mu_ref, _, _ = step_mean(x, sigma, sigma_next)
            transformer.enable_adapters()
        kl = ((mu - mu_ref) ** 2).mean((1, 2, 3)) / (2 * std_dev_t ** 2)
        total = total + (policy + beta * kl.mean()) / len(trained)
    return torch.autograd.grad(total, params)


def test_grpo_gradient_is_flow_grpos(tiny_dir, monkeypatch, tmp_path):
    """One grpo update with the defaults (CFG in the loss, global std and clamp, 9 of 10 steps, their KL) has the
    gradient of Flow-GRPO's formulas computed independently above, on the same rollout. Rewards: random, with an
    outlier so that the clamp binds; the LoRA's B random so that the policy differs from the reference (else the
    KL's gradient is zero). Catches: group std instead of global, no clamp, all 10 steps trained, a gradient
    through the unconditional branch, the KL divided by the step's full variance (sqrt(-dt) kept)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    seen = {}
    add_lora = step_grpo.add_lora

    def add_random_lora(transformer, *a, **kw):
        trainable = add_lora(transformer, *a, **kw)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.05
        seen["transformer"] = transformer
        return trainable

    def rewards(vae, latents, prompts):
        r = torch.randn(len(latents), generator=g)
        r[int(torch.randint(0, len(r), (), generator=g))] = 30.0  # |A| > 5 for it
        seen["rewards"] = r  # the evaluations' calls come before and after the rollout's
        return r

    rollout = step_grpo.rollout

    def recording_rollout(prompts, ctx, generators):
        records, embeds, log = rollout(prompts, ctx, generators)
        seen["prompts"], seen["records"], seen["rollout_rewards"] = prompts, records, seen["rewards"]
        return records, embeds, log

    def capture(params, max_norm):  # the gradient before clipping, and the weights it was taken at
        seen["grads"] = [p.grad.clone() for p in params]
        import copy
        seen["at"] = copy.deepcopy(seen["transformer"])
        return torch.zeros(())

    monkeypatch.setattr(step_grpo, "add_lora", add_random_lora)
    monkeypatch.setattr(step_grpo, "oracle_scores", rewards)
    monkeypatch.setattr(step_grpo, "rollout", recording_rollout)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    guidance = 1.5 + 3 * float(torch.rand((), generator=g))
    step_grpo.main(step_grpo.parse_args([
        *RUN, "--model", tiny_dir, "--reward", "oracle", "--mode", "grpo", "--group", "12", "--steps", "10",
        "--guidance", f"{guidance}", "--kl-beta", "0.5", "--max-steps", "1", "--eval-every", "0", "--seed",
        str(int(torch.randint(0, 1000, (), generator=g))), "--out", str(tmp_path / "run"), "--prompts-per-step",
        "3"]))  # later flags win
    assert len(seen["records"]) == 10 and len(seen["rollout_rewards"]) == 36
    expected = flow_grpo_gradient(seen["at"], model.load_pipeline(tiny_dir), list(seen["prompts"]), seen["records"],
                                  seen["rollout_rewards"], 12, guidance, beta=0.5)
    got = torch.cat([t.flatten() for t in seen["grads"]])
    want = torch.cat([t.flatten() for t in expected])
    assert want.norm() > 0
    assert (got - want).norm() <= 1e-4 * want.norm(), float((got - want).norm() / want.norm())


def test_the_ratio_uses_the_stored_log_probs(tiny_dir, monkeypatch, tmp_path):
    """The rollout's stored log-probs shifted by delta: the first update's ratio exp(logp - logp_old) is exp(-delta),
    so the logged mean |ratio - 1| is |exp(-delta) - 1|. Catches: the loss taking the ratio against the new
    log-probs themselves (ppo_clip_loss(logp, logp.detach(), ...)), whose ratio is 1 whatever was stored."""
    delta = float(torch.empty(()).uniform_(0.01, 0.05)) * (1 if torch.rand(()) < 0.5 else -1)
    rollout = step_grpo.rollout

    def shifted(prompts, ctx, generators):
        records, embeds, log = rollout(prompts, ctx, generators)
        for record in records:
            record["logp"] = record["logp"] + delta
        return records, embeds, log
    monkeypatch.setattr(step_grpo, "rollout", shifted)
    monkeypatch.setattr(step_grpo, "oracle_scores", lambda vae, latents, prompts: latents[:, 0].flatten(1).mean(1))
    out = str(tmp_path / "shifted")
    step_grpo.main(step_grpo.parse_args([*RUN, "--model", tiny_dir, "--reward", "oracle", "--mode", "step", "--k",
                                         "2", "--max-steps", "1", "--eval-every", "0", "--out", out]))
    row = metrics(out)[0]
    assert row["ratio_dev"] == pytest.approx(abs(math.exp(-delta) - 1), rel=1e-3), (delta, row["ratio_dev"])
    assert row["clip_frac"] == 1.0  # |ratio - 1| > 1e-4 everywhere: every sample clipped


def test_a_second_inner_epoch_is_off_policy(tiny_dir, monkeypatch, tmp_path):
    """--inner-epochs 2: the first epoch's ratio is 1 (on-policy), the second's is not (the first update moved the
    policy away from the stored log-probs). Catches: the stored log-probs recomputed or ignored in the loss."""
    monkeypatch.setattr(step_grpo, "oracle_scores", lambda vae, latents, prompts: latents[:, 0].flatten(1).mean(1))
    out = str(tmp_path / "epochs")
    step_grpo.main(step_grpo.parse_args([*RUN, "--model", tiny_dir, "--reward", "oracle", "--mode", "grpo",
                                         "--group", "2", "--inner-epochs", "2", "--max-steps", "2", "--eval-every",
                                         "0", "--seed", str(int(torch.randint(0, 1000, ()))), "--out", out]))
    for row in metrics(out):
        assert row["ratio_dev"] < 1e-5 and row["ratio_dev_last_epoch"] > 1e-4, row  # past the clip range
