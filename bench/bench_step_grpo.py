"""Seconds per iteration, throughput and peak memory of step_grpo.py at real scale, both modes side by side.

A random-weight pipeline of SD3.5-Medium's transformer shape (the one bench_step_sample.py builds) and a frozen DRM
over it (m = 3, untrained head) are written to --work once; then `step_grpo.py` itself runs each configuration
(under torchrun for --gpus > 1) for --iters iterations, and the table is read from its metrics.jsonl. Matched
candidate counts by default: step mode scores k = 4 candidates of each of P prompts' shared latents per step, grpo
mode runs P x group = P x 4 trajectories, so both sample P * 4 latents per step (--k, --group change them:
Flow-GRPO's own group is 24). 512 px, T = 10, LoRA r = 32, bf16,
gradient checkpointing. The first iteration is a warm-up and is left out of the medians.

    python bench/bench_step_grpo.py --out bench/results/step_grpo.json                 # one GPU, ~4 min
    python bench/bench_step_grpo.py --gpus 1,2 --out bench/results/step_grpo_x2.json  # scaling on 2 GPUs
    python bench/bench_step_grpo.py --gpus 1,8 --same-global-batch --iters 10 ...      # loss curves vs 1 GPU
    python bench/bench_step_grpo.py --gpus 1,2,4,8 --group 24 --prompts 2 ...          # Flow-GRPO's group size
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model  # noqa: E402
from bench.bench_step_sample import real_shape_pipeline  # noqa: E402

# FLOPs of one SD3.5-Medium forward at 512 px with 77 + 256 text tokens (../shared/GPU.md): full and 21-block prefix.
FULL_TFLOP, PREFIX_TFLOP = 2.44, 2.19
CURVES = ("reward", "reward_chosen", "loss", "grad_norm", "ratio_dev")  # per-iteration series kept in the JSON


def curve_gap(row, base):
    """Largest relative difference, over iterations, of reward and grad norm between a run and the 1-GPU run (only
    meaningful with --same-global-batch: the same prompts and noise, split differently)."""
    gaps = [abs(a - b) / max(abs(b), 1e-12) for name in ("reward", "grad_norm") for a, b in zip(row[name], base[name])]
    return round(max(gaps), 6)


def iteration_tflop(mode, prompts, k, steps, cfg=False):
    """Model FLOPs of one iteration: rollout forwards, DRM prefixes, and the update (forward + backward ~ 3x, plus
    one recomputed forward under gradient checkpointing)."""
    latents = prompts * (1 if mode == "step" else k)  # shared latents in the policy forward
    rows = latents * (2 if cfg else 1)
    rollout = steps * rows * FULL_TFLOP
    drm = (steps * prompts * k if mode == "step" else prompts * k) * PREFIX_TFLOP
    update = steps * rows * FULL_TFLOP * 4
    return rollout + drm + update


def prepare(work, t5_tokens, tiny):
    pipeline_dir, drm_path = os.path.join(work, "pipeline"), os.path.join(work, "drm.safetensors")
    if not os.path.isfile(drm_path):
        if tiny:
            from tiny_pipeline import TINY_TRANSFORMER, build_tiny_pipeline
            pipe, m = build_tiny_pipeline(0, dict(TINY_TRANSFORMER)), 1
        else:
            pipe, m = real_shape_pipeline("cuda", torch.bfloat16), 3
        pipe.save_pretrained(pipeline_dir)
        model.save_drm(model.DRM(pipe.transformer, skip_last_blocks=m), drm_path, pipeline_dir, t5_tokens)
        del pipe
    with open(os.path.join(work, "prompts.txt"), "w") as f:
        f.write("\n".join(f"a photo of a cat number {i}" for i in range(256)))
    return pipeline_dir, drm_path


def global_prompts(per_gpu, gpus, args):
    """Prompts per iteration, all GPUs together: per_gpu each (weak scaling), or per_gpu in all (--same-global-batch,
    so that the loss curves can be held against the one-GPU run's)."""
    return per_gpu if args.same_global_batch else per_gpu * gpus


def run(config, gpus, args, pipeline_dir, drm_path):
    out = os.path.join(args.work, f"{config['mode']}_g{gpus}")
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    launcher = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={gpus}"]
    flags = ["--model", pipeline_dir, "--drm", drm_path, "--mode", config["mode"], "--k", str(args.k), "--group",
             str(args.group),
             "--prompts", os.path.join(args.work, "prompts.txt"), "--eval-prompts",
             os.path.join(args.work, "prompts.txt"), "--eval-num", "1", "--eval-steps", "2", "--eval-every", "0",
             "--prompts-per-step", str(global_prompts(config["prompts"], gpus, args)), "--steps", "10",
             "--height", str(args.size), "--width", str(args.size), "--max-steps", str(args.iters),
             "--save-every", "100000", "--gradient-checkpointing", "--lora-rank", "32", "--lora-alpha", "64",
             "--seed", "0", "--out", out]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    subprocess.run(launcher + [os.path.join(ROOT, "step_grpo.py")] + flags, check=True, env=env, cwd=ROOT)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    seconds = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    median = statistics.median(seconds)
    prompts = global_prompts(config["prompts"], gpus, args)
    per_prompt = args.k if config["mode"] == "step" else args.group  # candidates per prompt per step
    finals = prompts * (1 if config["mode"] == "step" else args.group)
    tflop = iteration_tflop(config["mode"], prompts, per_prompt, 10)
    return dict(mode=config["mode"], gpus=gpus, prompts_per_iter=prompts, final_images_per_iter=finals,
                candidates_per_step=prompts * per_prompt, median_s_per_iter=round(median, 3),
                min=round(min(seconds), 3),
                max=round(max(seconds), 3), images_per_s=round(finals / median, 3),
                prompt_groups_per_s=round(prompts / median, 3), peak_gib=max(r.get("peak_gib", 0) for r in rows),
                tflops_per_gpu=0.0 if args.tiny else round(tflop / median / gpus, 1),
                **{name: [r[name] for r in rows] for name in CURVES})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1", help="GPU counts to run, comma-separated (torchrun for > 1)")
    p.add_argument("--modes", default="step,grpo", help="modes")
    p.add_argument("--prompts", type=int, default=8, help="prompts per GPU per iteration")
    p.add_argument("--k", type=int, default=4, help="step mode: candidates per prompt per step")
    p.add_argument("--group", type=int, default=4, help="grpo mode: trajectories per prompt")
    p.add_argument("--same-global-batch", action="store_true", help="--prompts in all, split over the GPUs (for "
                   "comparing loss curves with one GPU) instead of --prompts per GPU")
    p.add_argument("--iters", type=int, default=3, help="iterations per configuration (the first is warm-up)")
    p.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens")
    p.add_argument("--work", default="runs/bench_step_grpo", help="scratch folder (the 4.5 GB pipeline)")
    p.add_argument("--out", default="bench/results/step_grpo.json", help="JSON output")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check of this script on the tiny pipeline")
    args = p.parse_args()
    args.size = 512
    if args.tiny:
        args.size, args.t5_tokens, args.prompts, args.iters = 32, 16, 2, 2
        args.work, args.out = args.work + "_tiny", args.out.replace(".json", "_tiny.json")
    elif not torch.cuda.is_available():
        raise SystemExit("bench_step_grpo.py needs a GPU for the real-scale shape (--tiny: CPU smoke check)")
    os.makedirs(args.work, exist_ok=True)
    pipeline_dir, drm_path = prepare(args.work, args.t5_tokens, args.tiny)
    rows = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        for mode in args.modes.split(","):
            rows.append(run(dict(mode=mode, prompts=args.prompts), gpus, args, pipeline_dir, drm_path))
            base = next((r for r in rows if r["mode"] == mode and r["gpus"] == 1), None)
            if base:
                rows[-1]["scaling"] = round(rows[-1]["images_per_s"] / base["images_per_s"], 3)
                rows[-1]["efficiency"] = round(rows[-1]["scaling"] / gpus, 3)
                if args.same_global_batch:
                    rows[-1]["curve_gap_vs_1gpu"] = curve_gap(rows[-1], base)
            print({k: v for k, v in rows[-1].items() if k not in CURVES}, flush=True)
    print(f"\n{'mode':>5} {'gpus':>4} {'s/iter':>8} {'min':>7} {'max':>7} {'img/s':>7} {'groups/s':>8} "
          f"{'TFLOP/s/GPU':>11} {'GiB':>6} {'scaling':>7} {'eff.':>5}")
    for r in rows:
        print(f"{r['mode']:>5} {r['gpus']:>4} {r['median_s_per_iter']:>8.3f} {r['min']:>7.3f} {r['max']:>7.3f} "
              f"{r['images_per_s']:>7.3f} {r['prompt_groups_per_s']:>8.3f} {r['tflops_per_gpu']:>11.1f} "
              f"{r['peak_gib']:>6.1f} {r.get('scaling', float('nan')):>7.2f} "
              f"{r.get('efficiency', float('nan')):>5.2f}"
              + (f"  curves within {r['curve_gap_vs_1gpu']:.1e} of 1 GPU" if "curve_gap_vs_1gpu" in r else ""))
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", tiny=args.tiny,
                torch=torch.__version__, size=args.size, steps=10, k=args.k, group=args.group, lora_rank=32,
                dtype="bf16",
                gradient_checkpointing=True, transformer="SD35_MEDIUM",
                tflop_note="model FLOPs from ../shared/GPU.md constants: rollout + DRM prefixes + 4x forward update")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
