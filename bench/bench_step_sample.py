"""Seconds per image of Step-wise Sampling (PAPER.md section 4) against plain sampling, at real scale.

The pipeline is SD3.5-Medium's transformer shape with random weights and SD3's VAE shape (speed does not depend
on the values), with small random text encoders of the real output widths (CLIP 768 + 1280 pooled = 2048, T5
width 4096), so prompt embeddings have the real shapes (77 + 256 tokens); text encoding is a negligible part.
The DRM is frozen over the generator's own transformer, m = 3. Every configuration runs `step_sample.step_sample`
(50 steps, CFG 4.5, noise level 0.7, 512 px): k = 1, 2, 4, 6 at batch 1 and 8, with the prefix reuse on and off.
Reported: median and min/max seconds per image over --repeats runs after one warm-up, the ratio to k = 1, and
the peak memory. The paper's ratio at k = 6 is 3.4x (9.83 s / 2.88 s); the aim is <= 2.5x.

    python bench/bench_step_sample.py --out bench/results/step_sample.json        # one GPU, ~5 min
    python bench/bench_step_sample.py --variants eager,compile --batches 8 --ks 1,6 # eager vs torch.compile
    python bench/bench_step_sample.py --tiny                                        # CPU smoke check
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402

import model  # noqa: E402
import step_sample  # noqa: E402
from tiny_pipeline import SD35_MEDIUM, TINY_TRANSFORMER, build_tiny_pipeline, tiny_tokenizers  # noqa: E402

SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
               layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.0609, scaling_factor=1.5305)


def real_shape_pipeline(device, dtype):
    """SD3.5-Medium transformer + SD3 VAE shapes, random weights; text encoders of the real widths, one layer."""
    clip_tok, t5_tok = tiny_tokenizers()

    def clip(width, projection):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=width, num_hidden_layers=1,
            num_attention_heads=8, projection_dim=projection, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))

    with torch.device(device):
        parts = dict(transformer=SD3Transformer2DModel(**SD35_MEDIUM), vae=AutoencoderKL(**SD3_VAE),
                     text_encoder=clip(768, 768), text_encoder_2=clip(1280, 1280),
                     text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=1024,
                                                            num_layers=1, num_heads=8)))
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tok,
                                    tokenizer_2=clip_tok, tokenizer_3=t5_tok, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def time_config(pipe, drm, batch, k, reuse, args, size):
    prompts, seeds = ["a photo of a cat"] * batch, list(range(batch))
    kw = dict(k=k, steps=args.steps, guidance=4.5, noise_level=0.7, height=size, width=size,
              max_sequence_length=args.t5_tokens, reuse=reuse)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    step_sample.step_sample(pipe, drm, prompts, seeds, **(kw | dict(steps=2)))  # warm-up (same shapes; compiles)
    sync()
    warmup = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step_sample.step_sample(pipe, drm, prompts, seeds, **kw)
        sync()
        times.append((time.perf_counter() - t0) / batch)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    return dict(batch=batch, k=k, reuse=reuse, warmup_s=round(warmup, 2),
                median_s_per_image=round(statistics.median(times), 4),
                min=round(min(times), 4), max=round(max(times), 4), peak_gib=round(peak, 2))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke check on the tiny pipeline")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    p.add_argument("--batches", default="1,8", help="batch sizes")
    p.add_argument("--ks", default="1,2,4,6", help="candidate counts")
    p.add_argument("--no-reuse-ks", default="2,4,6", help="k values also timed with the prefix reuse off")
    p.add_argument("--variants", default="eager", help="eager and/or compile (model.compile_blocks), run in this "
                   "order on the same pipeline; a compiled row's warmup_s includes its compile time")
    p.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens (text = 77 + this)")
    p.add_argument("--out", default="bench/results/step_sample.json", help="JSON output")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        pipe, size, m = build_tiny_pipeline(0, dict(TINY_TRANSFORMER)), 32, 1
        pipe.set_progress_bar_config(disable=True)
        args.steps, args.repeats, args.t5_tokens = min(args.steps, 4), 1, 16
    else:
        pipe, size, m = real_shape_pipeline(device, torch.bfloat16), 512, 3
    drm = model.DRM(pipe.transformer, skip_last_blocks=m).to(device).eval()
    rows = []
    for variant in args.variants.split(","):
        if variant == "compile":
            model.compile_blocks(pipe.transformer)
        for batch in (int(b) for b in args.batches.split(",")):
            for k in (int(v) for v in args.ks.split(",")):
                no_reuse = {int(v) for v in args.no_reuse_ks.split(",") if v}
                for reuse in ((False,) if k == 1 else (False, True) if k in no_reuse else (True,)):
                    rows.append(time_config(pipe, drm, batch, k, reuse, args, size) | dict(variant=variant))
                    base = next(r for r in rows if r["batch"] == batch and r["k"] == 1 and r["variant"] == variant)
                    rows[-1]["ratio_to_k1"] = round(rows[-1]["median_s_per_image"] / base["median_s_per_image"], 3)
                    print(rows[-1], flush=True)
    print(f"\n{'variant':>7} {'batch':>5} {'k':>3} {'reuse':>5} {'s/image':>9} {'min':>8} {'max':>8} {'x k=1':>6} "
          f"{'GiB':>6} {'warm-up s':>9}")
    for r in rows:
        print(f"{r['variant']:>7} {r['batch']:>5} {r['k']:>3} {str(r['reuse']):>5} {r['median_s_per_image']:>9.4f} "
              f"{r['min']:>8.4f} {r['max']:>8.4f} {r['ratio_to_k1']:>6.2f} {r['peak_gib']:>6.2f} {r['warmup_s']:>9.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                steps=args.steps, size=size, t5_tokens=args.t5_tokens, guidance=4.5, noise_level=0.7,
                transformer="tiny" if args.tiny else "SD35_MEDIUM", skip_last_blocks=m,
                dtype="fp32" if args.tiny else "bf16")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
