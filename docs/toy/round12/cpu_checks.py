"""CPU checks of the shipped toy assets (written in round 12, rerun on rounds 13, 14 and 15), on the tests' fixed
sets, at guidance 1 and 4.5:
the DRM's accuracy on pairs of base samples (test_shipped_drm_ranks_held_out_pairs_like_the_oracle) and the gain of
step-wise sampling k = 4 over k = 1 (test_stepwise_sampling_with_the_shipped_drm_beats_plain_sampling, and the same
on a shifted prompt set). About 10 minutes on 2 cores.

    python docs/toy/round12/cpu_checks.py [ASSETS_FOLDER]      # default toy/assets
"""
import itertools
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
import model  # noqa: E402
import step_sample  # noqa: E402
from toy import world  # noqa: E402

ASSETS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "toy", "assets")


def pair_accuracy(pipe, drm, held_out, guidance):
    """24 held-out prompts x 6 seeds, 20 steps; pairs of a prompt's samples with an oracle gap >= 0.15."""
    prompts = [p for p in held_out[::len(held_out) // 24][:24] for _ in range(6)]
    images = pipe(prompt=prompts, num_inference_steps=20, guidance_scale=guidance, height=64, width=64,
                  max_sequence_length=16, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
                  output_type="pt").images * 2 - 1
    oracle = world.score(((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), prompts)
    embeds, pooled = model.encode_prompts(pipe, prompts, 16)
    with torch.no_grad():
        scores = model.score_images(drm, pipe.vae, images, embeds, pooled).numpy()
    groups = [range(start, start + 6) for start in range(0, len(prompts), 6)]
    pairs = [(a, b) for group in groups for a, b in itertools.combinations(group, 2)
             if abs(oracle[a] - oracle[b]) >= 0.15]
    right = [(scores[a] - scores[b]) * (oracle[a] - oracle[b]) > 0 for a, b in pairs]
    print(f"fixed pairs, guidance {guidance}: base oracle {oracle.mean():.3f} +- {oracle.std():.3f}, "
          f"DRM accuracy {np.mean(right):.3f} over {len(pairs)} pairs", flush=True)


def step_sampling_gain(pipe, drm, held_out, guidance, offset):
    """k = 4 against k = 1 on 24 held-out prompts (held_out[offset::8]), seeds 100-123, 20 steps."""
    prompts = held_out[offset::len(held_out) // 24][:24]
    kw = dict(steps=20, guidance=guidance, height=64, width=64, max_sequence_length=16)
    plain, _ = step_sample.step_sample(pipe, drm, prompts, list(range(100, 124)), k=1, **kw)
    chosen, _ = step_sample.step_sample(pipe, drm, prompts, list(range(100, 124)), k=4, **kw)
    a = world.score(world.tensor_pixels(plain), prompts)
    b = world.score(world.tensor_pixels(chosen), prompts)
    half = 1.96 * (b - a).std(ddof=1) / np.sqrt(len(a))
    print(f"step-wise sampling, guidance {guidance}, prompts held_out[{offset}::8]: k = 1 {a.mean():.3f}, "
          f"k = 4 {b.mean():.3f}, gain {(b - a).mean():+.3f} +- {half:.3f}", flush=True)


if __name__ == "__main__":
    pipe = model.load_pipeline(os.path.join(ASSETS, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    drm, _ = model.load_drm(os.path.join(ASSETS, "drm.safetensors"), pipe.transformer)
    held_out = world.split_prompts()[1]
    for guidance in (1.0, 4.5):
        pair_accuracy(pipe, drm, held_out, guidance)
    for guidance in (1.0, 4.5):
        for offset in (5, 3):
            step_sampling_gain(pipe, drm, held_out, guidance, offset)
