"""Speed and memory of the DRM Bradley-Terry training step (PAPER.md section 1) at real scale.

What one step is: a batch of B preference pairs (winner, loser, prompt). One sigma per pair (logit-normal), the
winner and loser latents noised independently (x = (1 - s) * x0 + s * eps, timestep = 1000 * s) and scored in ONE
(2B, ...) forward of `model.DRM`; loss = -logsigmoid(s_win - s_lose).mean(), backward, grad clip 1.0, AdamW
(lr 1e-5, wd 1e-4), all under bf16 autocast: the official recipe's step.

Where it departs from real training: the transformer is SD3.5-Medium's SHAPE with random weights (speed and memory
do not depend on the values), and the inputs are random tensors of the real shapes: latents (16, 64, 64) = 512 px,
prompt_embeds (B, 77 + 512, 4096), pooled (B, 2048). The VAE and the three text encoders are NOT run and NOT timed
(training would cache their outputs or run them under no_grad; they are a separate cost).

Backbone modes:
- frozen: transformer weights in bf16, requires_grad False; only the ConvGN head `reward_output` trains (fp32).
  The prefix then builds no autograd graph: a step is a no-grad prefix forward plus the head's forward/backward.
- full:   the whole prefix trains, fp32 master weights under bf16 autocast (AMP), fused AdamW. If a batch runs
  out of memory it is retried with `drm.gradient_checkpointing = True` (the table says which ran).

FLOPs: counted with torch.utils.flop_counter.FlopCounterMode on one eager forward+backward of ONE pair per mode
(matmuls, attention, convolutions; elementwise ops and the optimizer are not counted), times B: every counted op
is per sample, so the count is exact in B. Recompute under gradient checkpointing is not counted (model FLOPs).
The % column is against --peak_tflops (790: an 8192^3 bf16 matmul on this H200); the run also measures that
matmul itself and prints it. Peak memory is torch.cuda.max_memory_allocated from the first training step on
(weights, optimizer state, gradients, activations; the build's transient fp32 copy is left out).

Commands:
  python bench/bench_reward_train.py                      # GPU, SD3.5-Medium shape (~5 min on one H200)
  python bench/bench_reward_train.py --tiny               # CPU smoke check on the tiny transformer
  python bench/bench_reward_train.py --configs frozen:16,full:2 --steps 20
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import SD3Transformer2DModel  # noqa: E402

import model  # noqa: E402
import tiny_pipeline  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tiny", action="store_true",
                    help="CPU smoke check: tiny transformer, skip_last_blocks=1, 16x16 latents, 77+8 text tokens")
parser.add_argument("--configs", default=None,
                    help="comma list of MODE:PAIRS[:compile]; default frozen:8,frozen:16,frozen:32,full:2,full:8,"
                         "frozen:32:compile (tiny: frozen:2,frozen:4,full:2,frozen:4:compile)")
parser.add_argument("--warmup", type=int, default=None, help="untimed steps per config (default 3; tiny 1)")
parser.add_argument("--steps", type=int, default=None, help="timed steps per config (default 12; tiny 3)")
parser.add_argument("--skip_last_blocks", type=int, default=None, help="m, blocks cut off the top (default 3; tiny 1)")
parser.add_argument("--t5_tokens", type=int, default=None, help="T5 length; text = 77 + this (default 512; tiny 8)")
parser.add_argument("--latent_size", type=int, default=None, help="latent height = width (default 64 = 512 px)")
parser.add_argument("--peak_tflops", type=float, default=790.0, help="bf16 peak the % column is measured against")
parser.add_argument("--time_budget", type=float, default=420.0,
                    help="seconds: a config not yet started when this much has passed is skipped, not run")
parser.add_argument("--out", default="bench/results/reward_train.json", help="where the JSON results go")
args = parser.parse_args()

tiny = args.tiny
device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
TRANSFORMER_CONFIG = tiny_pipeline.TINY_TRANSFORMER if tiny else tiny_pipeline.SD35_MEDIUM
skip_last_blocks = args.skip_last_blocks if args.skip_last_blocks is not None else (1 if tiny else 3)
text_tokens = 77 + (args.t5_tokens if args.t5_tokens is not None else (8 if tiny else 512))
latent_size = args.latent_size or (16 if tiny else 64)
warmup_steps = args.warmup if args.warmup is not None else (1 if tiny else 3)
timed_steps = args.steps if args.steps is not None else (3 if tiny else 12)
config_spec = args.configs or ("frozen:2,frozen:4,full:2,frozen:4:compile" if tiny else
                               "frozen:8,frozen:16,frozen:32,full:2,full:8,frozen:32:compile")
configs = []
for item in config_spec.split(","):
    parts = item.strip().split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("frozen", "full") or not parts[1].isdigit() \
            or (len(parts) == 3 and parts[2] != "compile"):
        parser.error(f"--configs: '{item}' is not MODE:PAIRS[:compile] with MODE frozen or full")
    configs.append((parts[0], int(parts[1]), len(parts) == 3))
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls outside autocast
    torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------------------------------
# The step: small pure functions, then one function that does what the trainer does

def bt_loss(score_win, score_lose):
    """Bradley-Terry: -log sigmoid(s_w - s_l), averaged over pairs."""
    return -F.logsigmoid(score_win - score_lose).mean()


def noise_pairs(x0_win, x0_lose):
    """One logit-normal sigma per pair, independent noise for winner and loser, both in one (2B, ...) batch."""
    sigma = torch.sigmoid(torch.randn(x0_win.shape[0], device=x0_win.device))  # (B,)
    sigma2 = sigma.repeat(2)  # (2B,): winners then losers
    x0 = torch.cat([x0_win, x0_lose])  # (2B, C, h, w)
    s = sigma2.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * torch.randn_like(x0), 1000 * sigma2


def forward_backward(drm, batch):
    x0_win, x0_lose, prompt_embeds, pooled = batch
    latents, timestep = noise_pairs(x0_win, x0_lose)  # (2B, C, h, w), (2B,)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        scores = drm(latents, timestep, prompt_embeds.repeat(2, 1, 1), pooled.repeat(2, 1))  # (2B,)
    loss = bt_loss(*scores.chunk(2))
    loss.backward()
    return loss


def train_step(drm, optimizer, params, batch):
    forward_backward(drm, batch)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# Building, measuring, freeing

def build_drm(mode, gradient_checkpointing):
    """SD3.5 transformer of the chosen shape with random weights, built straight on the device, wrapped in a DRM."""
    with device:
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        if mode == "frozen":
            transformer.to(torch.bfloat16)  # the generator's own weights, shared; only the head trains (fp32)
        drm = model.DRM(transformer, skip_last_blocks=skip_last_blocks, mode=mode)
    drm.gradient_checkpointing = gradient_checkpointing
    return drm.to(device).train()


def make_batch(pairs):
    """Random stand-ins for cached VAE latents and SD3 text embeddings of B pairs (one prompt per pair)."""
    cfg = TRANSFORMER_CONFIG
    x0 = torch.randn(2, pairs, cfg["in_channels"], latent_size, latent_size, device=device)  # (2, B, C, h, w)
    prompt_embeds = torch.randn(pairs, text_tokens, cfg["joint_attention_dim"], device=device, dtype=torch.bfloat16)
    pooled = torch.randn(pairs, cfg["pooled_projection_dim"], device=device, dtype=torch.bfloat16)
    return x0[0], x0[1], prompt_embeds, pooled


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops_per_pair(drm):
    """Counted FLOPs of one forward+backward of one pair (no optimizer step), with a per-op breakdown."""
    checkpointing, drm.gradient_checkpointing = drm.gradient_checkpointing, False
    with FlopCounterMode(display=False) as counter:
        forward_backward(drm, make_batch(1))
    drm.gradient_checkpointing = checkpointing
    drm.zero_grad(set_to_none=True)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def time_steps(step, n):
    """Per-step seconds of n back-to-back steps: CUDA events on the GPU (host runs ahead), wall clock on the CPU."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def measure_matmul_tflops():
    """The bf16 ceiling of this GPU, re-measured: 8192^3 matmul on random data, mean of 10 after 3 warm-ups."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = time_steps(lambda: a @ b, 13)[3:]
    return 2 * 8192 ** 3 / statistics.mean(times) / 1e12


def free_memory():
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gib(n_bytes):
    return n_bytes / 2 ** 30


def run_config(mode, pairs, use_compile, gradient_checkpointing, flops_per_pair):
    """Build, warm up, time. Returns one result dict; fills flops_per_pair[mode] on the mode's first config."""
    drm = build_drm(mode, gradient_checkpointing)
    params = [p for p in drm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=device.type == "cuda")
    if mode not in flops_per_pair:
        flops_per_pair[mode] = count_flops_per_pair(drm)
    batch = make_batch(pairs)
    if device.type == "cuda":  # peak of training only: not the fp32 -> bf16 transient of building a frozen backbone
        torch.cuda.reset_peak_memory_stats()
    scorer = torch.compile(drm) if use_compile else drm  # shares drm's parameters

    def step():
        train_step(scorer, optimizer, params, batch)

    # 1. warm-up: the first step holds compilation (and cuDNN / allocator warm-up)
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup_steps - 1):
        step()
    sync()
    resident = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # weights + optimizer state
    # 2. timed steps
    times = sorted(time_steps(step, timed_steps))
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) >= 2 else [median] * 3
    flops = flops_per_pair[mode][0] * pairs
    return dict(
        mode=mode, pairs=pairs, compiled=use_compile, gradient_checkpointing=gradient_checkpointing,
        trainable_params=sum(p.numel() for p in params), total_params=sum(p.numel() for p in drm.parameters()),
        steps_timed=len(times), median_ms=1e3 * median, min_ms=1e3 * times[0], max_ms=1e3 * times[-1],
        q1_ms=1e3 * quartiles[0], q3_ms=1e3 * quartiles[2], pairs_per_s=pairs / median,
        first_step_s=first_step_s, compile_s=first_step_s - median if use_compile else None,
        peak_gib=gib(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None,
        resident_gib=gib(resident) if device.type == "cuda" else None,
        flops_per_step=flops, tflops=flops / median / 1e12,
        pct_of_peak=100 * flops / median / 1e12 / args.peak_tflops)


def print_table(results):
    head = (f"{'config':<24} {'median ms':>10} {'min-max ms':>17} {'IQR ms':>15} {'pairs/s':>8} "
            f"{'peak GiB':>9} {'TFLOP/s':>8} {'% peak':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        name = f"{r['mode']} B={r['pairs']}" + (" compile" if r.get("compiled") else " eager") \
            + (" ckpt" if r.get("gradient_checkpointing") else "")
        if "median_ms" not in r:
            print(f"{name:<24} {r.get('error', 'not run')}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{name:<24} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f}-{r['max_ms']:<8.1f} "
              f"{r['q1_ms']:>7.1f}-{r['q3_ms']:<7.1f} {r['pairs_per_s']:>8.2f} {peak:>9} "
              f"{r['tflops']:>8.1f} {r['pct_of_peak']:>6.1f}%")


# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    start = time.perf_counter()
    meta = dict(
        what="DRM Bradley-Terry training step (noise pairs, one (2B,...) forward, BT loss, backward, clip, AdamW)",
        excluded="VAE and text encoders are not run and not timed: inputs are random latents and embeddings",
        transformer="TINY_TRANSFORMER" if tiny else "SD35_MEDIUM", transformer_config=TRANSFORMER_CONFIG,
        skip_last_blocks=skip_last_blocks, latents=[TRANSFORMER_CONFIG["in_channels"], latent_size, latent_size],
        image_tokens=(latent_size // TRANSFORMER_CONFIG["patch_size"]) ** 2, text_tokens=text_tokens,
        warmup_steps=warmup_steps, timed_steps=timed_steps, autocast="bf16", optimizer="AdamW lr 1e-5 wd 1e-4, "
        "clip 1.0 (fused on cuda)", flops_method="FlopCounterMode on one eager fwd+bwd of one pair, times B",
        peak_tflops_reference=args.peak_tflops, device=torch.cuda.get_device_name() if device.type == "cuda" else
        platform.processor() or "cpu", torch=torch.__version__, diffusers=__import__("diffusers").__version__,
        python=platform.python_version())
    print(f"# {meta['what']}\n# {meta['excluded']}\n# {meta['transformer']}, m={skip_last_blocks}, latents "
          f"{meta['latents']} ({meta['image_tokens']} image tokens), {text_tokens} text tokens, bf16 autocast, "
          f"{warmup_steps} warm-up + {timed_steps} timed steps, on {meta['device']}, torch {torch.__version__}")
    if device.type == "cuda":
        meta["measured_matmul_tflops"] = measure_matmul_tflops()
        print(f"# 8192^3 bf16 matmul here: {meta['measured_matmul_tflops']:.0f} TFLOP/s "
              f"(% column is vs {args.peak_tflops:.0f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results, flops_per_pair = [], {}

    for mode, pairs, use_compile in configs:
        elapsed = time.perf_counter() - start
        if elapsed > args.time_budget:
            results.append(dict(mode=mode, pairs=pairs, compiled=use_compile,
                                error=f"skipped: {elapsed:.0f} s had passed (--time_budget {args.time_budget:.0f})"))
            print(f"{mode} B={pairs}: {results[-1]['error']}", flush=True)
            continue
        # full mode falls back to gradient checkpointing when the batch does not fit
        for gradient_checkpointing in ([False, True] if mode == "full" else [False]):
            t0 = time.perf_counter()
            try:
                result, error = run_config(mode, pairs, use_compile, gradient_checkpointing, flops_per_pair), None
            except torch.cuda.OutOfMemoryError as e:
                result, error = None, f"out of memory: {str(e).splitlines()[0]}"
            free_memory()  # after the except clause: the traceback no longer holds the model
            if use_compile:
                torch._dynamo.reset()
            if result is not None:
                break
            print(f"{mode} B={pairs} ckpt={gradient_checkpointing}: {error}", flush=True)
        if result is None:
            result = dict(mode=mode, pairs=pairs, compiled=use_compile, error=error)
        result["config_wall_s"] = time.perf_counter() - t0
        results.append(result)
        if "median_ms" in result:
            print(f"{mode} B={pairs} {'compile' if use_compile else 'eager'}"
                  f"{' ckpt' if result['gradient_checkpointing'] else ''}: median {result['median_ms']:.1f} ms, "
                  f"{result['pairs_per_s']:.2f} pairs/s, peak {result['peak_gib'] or 0:.1f} GiB, "
                  f"{result['tflops']:.1f} TFLOP/s, first step {result['first_step_s']:.1f} s, "
                  f"config wall {result['config_wall_s']:.0f} s", flush=True)
        meta["flops_per_pair"] = {m: dict(total=f, by_op=ops) for m, (f, ops) in flops_per_pair.items()}
        meta["wall_s"] = time.perf_counter() - start
        with open(args.out, "w") as f:  # after every config, so a run cut short still leaves its results
            json.dump(dict(meta=meta, results=results), f, indent=1)

    print()
    print_table(results)
    for m, (f, ops) in flops_per_pair.items():
        print(f"# {m}: {f / 1e9:.1f} GFLOP per pair counted ("
              + ", ".join(f"{op.split('.')[-1]} {n / 1e9:.1f}" for op, n in ops.items()) + ")")
    for r in results:
        if r.get("compile_s") is not None:
            print(f"# compile ({r['mode']} B={r['pairs']}): first step {r['first_step_s']:.1f} s, "
                  f"so ~{r['compile_s']:.1f} s of compilation")
    print(f"# VAE and text encoders excluded from all timings. Total wall {time.perf_counter() - start:.0f} s. "
          f"JSON: {args.out}")
