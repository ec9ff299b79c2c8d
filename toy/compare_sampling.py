"""Does Step-wise Sampling beat plain sampling, and best-of-N at the same wall time? The toy-world check of PAPER.md
section 4's claim (SD3.5-M: k = 6 lifts ImageReward 1.01 -> 1.15 at 3.4x the time of k = 1, diversity kept), with
the toy oracle as the true reward. --scorer oracle lets the oracle itself choose (step-wise: on each candidate's
predicted clean image; best-of-N: on the final images): the same algorithms with a perfect reward model, their upper
bound; no DRM is needed then and the DRM column is empty.

1. Jobs: the first --prompts held-out toy prompts (toy.world.split_prompts()[1], in order) x --seeds seeds; job
   j of prompt i has seed i * S + j (S = --seeds): every job its own initial noise. 128 x 2 = 256 jobs by default.
2. Sample every job with step_sample.step_sample for each k in --ks (k = 1 is plain SDE sampling at --noise-level),
   and with the Euler ODE ("ode": k = 1 at noise level 0, what users run), timing each pass -> seconds per image.
   Score every final image with the oracle (at 64x64) and with the DRM at t = 0.
3. Best-of-N at matched wall time: for each k > 1, N = round(seconds per image of k / of k = 1), at least 1, plain
   SDE trajectories per job, the one the DRM scores highest at t = 0 kept. Seeds as step_sample.py --best-of-n
   draws them (trial i of seed s uses s + 7919 i, so trial 0 is the k = 1 image). Timed the same way.
4. Report (a markdown table, OUT/summary.json): per configuration the oracle mean with a 95% interval over jobs, its
   paired difference from k = 1 (same jobs) and, for k > 1, from its matched best-of-N, the DRM mean, seconds per
   image and diversity (the mean over prompts of the mean pairwise RMS pixel distance, in [0, 1] units, between a
   prompt's seeds). OUT/grid.png: the first 8 jobs, k = 1 vs the largest k vs its best-of-N, captioned o=oracle
   d=DRM. Every image is saved under OUT/images/CONFIG/ with a results.jsonl (prompt, seed, config, oracle, drm).

Choices to know:
- Seconds per image = the sampling time of a configuration's pass (batches of --batch-size, the device drained
  before and after each) / jobs; best-of-N's includes its DRM selection, no pass includes the report's scoring or
  PNG writing. An untimed warm-up batch runs first, so the first timed pass does not pay the device's start-up.
  One process, one device, on purpose: timings only compare within one run.
- The DRM column scores the decoded images (VAE mean, t = 0) in every configuration, as best-of-N selects them;
  step-wise sampling chose its last step on the latents, so its own final score can differ slightly.
- N = 1 makes best-of-N plain k = 1 sampling (its trial 0): it is not run again, k1 stands for it.
- Intervals are normal approximations that treat jobs as independent; the seeds of one prompt share it, so with
  --seeds > 1 the intervals are somewhat narrow. The paired difference cancels what the prompts share. Seeds
  0 .. S-1 for every prompt would instead share S initial noises among all prompts (on the toy pipeline, seed 0's
  and seed 1's mean oracle over the same 32 prompts differ by 0.08): jobs far from independent.
- The oracle sees images resized to 64x64 (bilinear, antialiased) when the pipeline samples another size; the
  grid and diversity use those 64x64 images too, the PNGs keep the sampled size.

    python -m toy.compare_sampling --out runs/compare_sampling      # the shipped pipeline and DRM
    python -m toy.compare_sampling --prompts 32 --ks 1,4 --steps 20 \\
        --out runs/compare_sampling_quick
    python -m toy.compare_sampling --scorer oracle --out runs/compare_sampling_oracle
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import UserError  # noqa: E402
from model import default_sequence_length, inference_dtype, load_drm, load_pipeline  # noqa: E402
from step_sample import best_of_n, final_scores, save_png, step_sample  # noqa: E402
from toy import world  # noqa: E402

BASELINE = "k1"
GRID_JOBS = 8
Z95 = 1.96


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drm", default=os.path.join(ROOT, "toy", "assets", "drm.safetensors"),
                   help="DRM checkpoint over the pipeline's transformer (default: the shipped one)")
    p.add_argument("--scorer", default="drm", choices=("drm", "oracle"), help="who chooses the candidates and "
                   "best-of-N's image: the DRM, or the oracle (an upper bound; no --drm needed)")
    p.add_argument("--out", default="runs/compare_sampling", help="output folder: summary.json, grid.png, images/")
    p.add_argument("--pipeline", default="toy/assets/pipeline", help="toy pipeline folder")
    p.add_argument("--prompts", type=int, default=128, help="the first N held-out toy prompts")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (0, 1, ...); diversity needs >= 2")
    p.add_argument("--ks", default="1,2,4,6", help="comma-separated k of step-wise sampling (k = 1 is always run)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the paper: 50)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off, as the toy "
                   "base is sampled: docs/toy/README.md round 11)")
    p.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a of k >= 1 and best-of-N")
    p.add_argument("--batch-size", type=int, default=16, help="jobs per batch (a step-wise batch scores B * k)")
    return p.parse_args(argv)


def check_args(args):
    """-> the k values (distinct, sorted, 1 included), or one UserError naming the flag."""
    if args.scorer == "drm" and not os.path.isfile(args.drm):
        raise UserError(f"--drm {args.drm!r}: no such file (the shipped one is "
                        f"toy/assets/drm.safetensors)")
    held_out = len(world.split_prompts()[1])
    if not 1 <= args.prompts <= held_out:
        raise UserError(f"--prompts {args.prompts}: must be between 1 and {held_out} (the toy world holds out "
                        f"{held_out} prompts)")
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: must be >= 1 (seeds per prompt)")
    try:
        ks = [int(v) for v in args.ks.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--ks {args.ks!r}: give comma-separated integers, e.g. 1,2,4,6") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--ks {args.ks!r}: give one or more k >= 1 (candidates per step), e.g. 1,2,4,6")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.guidance < 1:
        raise UserError(f"--guidance {args.guidance}: must be >= 1 (1: no classifier-free guidance)")
    if not args.noise_level > 0:
        raise UserError(f"--noise-level {args.noise_level}: must be > 0 (at 0 the k candidates of a step are one "
                        f"point; the ODE baseline is run anyway)")
    return sorted(set(ks) | {1})


# ----------------------------------------------------------------------------------------------------------------
# The math: pure functions of the scores, images and timings

def mean_interval(values, z=Z95):
    """(mean, low, high) with low/high = mean -+ z * std / sqrt(n) (std with n - 1); (mean, None, None) from one
    value."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(values, baseline, z=Z95):
    """(mean, low, high) of values - baseline, job by job (the same jobs, in the same order)."""
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape:
        raise ValueError(f"paired difference of {values.shape} and {baseline.shape} values: needs the same jobs")
    return mean_interval(values - baseline, z)


def diversity(images, seeds):
    """images (P * S, H, W, 3) in [0, 255], prompt-major (a prompt's S seeds together) -> the mean over prompts of
    the mean pairwise distance between a prompt's images, each distance the RMS over pixels in [0, 1] units.
    None with one seed."""
    if seeds < 2:
        return None
    x = np.asarray(images, dtype=np.float64).reshape(-1, seeds, np.prod(images.shape[1:])) / 255  # (P, S, D)
    pairs = [np.sqrt(((x[:, i] - x[:, j]) ** 2).mean(-1)) for i in range(seeds) for j in range(i + 1, seeds)]
    return float(np.mean(pairs))  # every prompt has as many pairs: the mean over pairs, then over prompts


def matched_n(seconds_k, seconds_1):
    """Best-of-N's N at the wall time of step-wise sampling at k: the time ratio rounded (halves up), at least 1."""
    return max(1, math.floor(seconds_k / seconds_1 + 0.5))


# ----------------------------------------------------------------------------------------------------------------
# Sampling

def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_config(name, jobs, pipe, drm, args, length, size, k=1, noise_level=0.7, num_trials=0, drm_length=None):
    """Sample, time and score every job under one configuration (num_trials > 0: best-of-num_trials), saving the
    images as they come. -> dict(prompts, seeds, oracle (J,), drm (J,), pixels (J, 64, 64, 3), seconds_per_image)."""
    folder = os.path.join(args.out, "images", name)
    os.makedirs(folder, exist_ok=True)
    by_oracle = args.scorer == "oracle"
    sampling = dict(steps=args.steps, guidance=args.guidance, noise_level=noise_level, height=size, width=size,
                    oracle=by_oracle, drm_sequence_length=drm_length)
    seconds, oracle, drm_values, pixels, rows = 0.0, [], [], [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=name):
        batch = jobs[start:start + args.batch_size]
        prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
        synchronize()
        began = time.perf_counter()
        if num_trials:
            images, scores, _ = best_of_n(pipe, drm, prompts, seeds, num_trials, length, **sampling)
        else:
            images, _ = step_sample(pipe, drm, prompts, seeds, k=k, max_sequence_length=length, **sampling)
        synchronize()
        seconds += time.perf_counter() - began
        if by_oracle:  # no DRM: its column stays empty
            scores = [float("nan")] * len(batch)
        elif not num_trials:  # the report's DRM score, outside the timing: only best-of-N needs it to sample
            scores = final_scores(drm, pipe, prompts, images, drm_length or length)
        batch_pixels = world.tensor_pixels(images)  # (B, 64, 64, 3)
        batch_oracle = world.score(batch_pixels, prompts)
        for row, (prompt, seed) in enumerate(batch):
            path = os.path.join(folder, f"{start + row:05d}.png")
            save_png(images[row], path)
            rows.append(dict(prompt=prompt, seed=seed, config=name, oracle=round(float(batch_oracle[row]), 5),
                             drm=round(float(scores[row]), 5), file=os.path.relpath(path, args.out)))
        oracle += batch_oracle.tolist()
        drm_values += list(scores)
        pixels.append(batch_pixels)
    with open(os.path.join(folder, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return dict(prompts=[p for p, _ in jobs], seeds=[s for _, s in jobs], oracle=np.array(oracle),
                drm=np.array(drm_values), pixels=np.concatenate(pixels), seconds_per_image=seconds / len(jobs),
                k=k, noise_level=noise_level, best_of_n=num_trials or None)


# ----------------------------------------------------------------------------------------------------------------
# The report

def summarize(results, matched, seeds):
    """results: {config: run_config's dict}, matched: {step-wise config: its best-of-N config} -> {config: entry}."""
    def r(value, digits=4):
        return None if value is None else round(value, digits)

    configs = {}
    for name, res in results.items():
        mean, low, high = mean_interval(res["oracle"])
        diff, diff_low, diff_high = paired_difference(res["oracle"], results[BASELINE]["oracle"])
        entry = dict(k=res["k"], noise_level=res["noise_level"], best_of_n=res["best_of_n"], jobs=len(res["oracle"]),
                     oracle_mean=r(mean), oracle_ci95=[r(low), r(high)], oracle_vs_k1=r(diff),
                     oracle_vs_k1_ci95=[r(diff_low), r(diff_high)],
                     drm_mean=None if np.isnan(res["drm"]).all() else r(float(res["drm"].mean())),
                     seconds_per_image=r(res["seconds_per_image"], 5), diversity=r(diversity(res["pixels"], seeds)))
        if name in matched:  # the same jobs sampled both ways: the paired difference is the comparison's own
            rival = results[matched[name]]
            diff, diff_low, diff_high = paired_difference(res["oracle"], rival["oracle"])
            entry.update(matched_best_of_n=matched[name], matched_seconds_per_image=r(rival["seconds_per_image"], 5),
                         oracle_vs_matched=r(diff), oracle_vs_matched_ci95=[r(diff_low), r(diff_high)])
        if res["best_of_n"]:
            entry["matches"] = [k for k, v in matched.items() if v == name]
        configs[name] = entry
    return configs


def markdown_table(configs):
    def num(value, digits=3, sign=""):
        return "-" if value is None else f"{value:{sign}.{digits}f}"

    def ci(pair, sign=""):
        return "" if pair[0] is None else f" [{num(pair[0], sign=sign)}, {num(pair[1], sign=sign)}]"

    lines = ["| configuration | oracle [95% CI] | vs k1 [95% CI] | DRM | s / image | best-of-N at matched time; "
             "oracle minus it [95% CI] | diversity |", "|---" * 7 + "|"]
    for name, e in configs.items():
        if "matched_best_of_n" in e:
            matched = (f"{e['matched_best_of_n']}: {num(e['matched_seconds_per_image'], 4)} s; "
                       f"{num(e['oracle_vs_matched'], sign='+')}{ci(e['oracle_vs_matched_ci95'], sign='+')}")
        else:
            matched = f"for {', '.join(e['matches'])}" if e.get("matches") else "-"
        lines.append(f"| {name} | {num(e['oracle_mean'])}{ci(e['oracle_ci95'])} | "
                     f"{num(e['oracle_vs_k1'], sign='+')}{ci(e['oracle_vs_k1_ci95'], sign='+')} | "
                     f"{num(e['drm_mean'], sign='+')} | {num(e['seconds_per_image'], 4)} | {matched} | "
                     f"{num(e['diversity'])} |")
    return "\n".join(lines)


def grid_sheet(results, columns, count, path):
    """Rows = the first `count` jobs, one column per configuration (its name on top), each image captioned
    'o=oracle d=drm' and the prompt on a row's first image: toy/evaluate.py's contact sheet, 64 px shown at 96."""
    cell, caption, header = 96, 14, 14
    sheet = Image.new("RGB", (len(columns) * cell, header + count * (cell + caption) + 2), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        res = results[name]
        draw.text((c * cell + 2, 1), name, fill="black")
        for i in range(count):
            top = header + i * (cell + caption)
            sheet.paste(Image.fromarray(res["pixels"][i]).resize((cell, cell), Image.NEAREST), (c * cell, top))
            drm = "" if np.isnan(res["drm"][i]) else f" d={res['drm'][i]:+.2f}"
            draw.text((c * cell + 2, top + cell), f"o={res['oracle'][i]:.2f}{drm}", fill="black")
            if c == 0:
                draw.text((2, top + 2), f"{res['prompts'][i][:30]} s{res['seeds'][i]}", fill="black")
    sheet.save(path)


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    ks = check_args(args)
    prompts = world.split_prompts()[1][:args.prompts]
    jobs = [(prompt, i * args.seeds + j) for i, prompt in enumerate(prompts) for j in range(args.seeds)]  # (P * S)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.pipeline, dtype=inference_dtype(args.pipeline, device), device=device)
    drm, config = load_drm(args.drm, pipe.transformer) if args.scorer == "drm" else (None, {})
    length = default_sequence_length(pipe)  # the generator's; the DRM reads its own training length
    drm_length = config.get("max_sequence_length", length)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    os.makedirs(args.out, exist_ok=True)
    run = lambda name, **kw: run_config(name, jobs, pipe, drm, args, length, size, drm_length=drm_length,  # noqa
                                        **kw)

    # 0. An untimed warm-up batch at the largest k (generator, DRM, prefix reuse, VAE), so no pass pays start-up.
    warm = jobs[:args.batch_size]
    images, _ = step_sample(pipe, drm, [p for p, _ in warm], [s for _, s in warm], k=ks[-1], steps=min(2, args.steps),
                            guidance=args.guidance, noise_level=args.noise_level, height=size, width=size,
                            max_sequence_length=length, oracle=args.scorer == "oracle", drm_sequence_length=drm_length)
    final_scores(drm, pipe, [p for p, _ in warm], images, drm_length, oracle=args.scorer == "oracle")

    # 1. Step-wise sampling at every k (k = 1: plain SDE sampling), and the Euler ODE sampler.
    results = {"ode": run("ode", k=1, noise_level=0.0)}
    for k in ks:
        results[f"k{k}"] = run(f"k{k}", k=k, noise_level=args.noise_level)

    # 2. Best-of-N at the wall time of each k > 1 (N = 1 is k1 itself).
    matched = {}
    for k in ks[1:]:
        n = matched_n(results[f"k{k}"]["seconds_per_image"], results[BASELINE]["seconds_per_image"])
        name = BASELINE if n == 1 else f"best_of_{n}"
        if name not in results:
            results[name] = run(name, noise_level=args.noise_level, num_trials=n)
        matched[f"k{k}"] = name

    # 3. Report: summary.json, the table, grid.png.
    configs = summarize(results, matched, args.seeds)
    summary = dict(pipeline=args.pipeline, scorer=args.scorer, drm=args.drm, prompts=args.prompts, seeds=args.seeds,
                   jobs=len(jobs),
                   ks=ks, steps=args.steps, guidance=args.guidance, noise_level=args.noise_level,
                   batch_size=args.batch_size, image_size=size, max_sequence_length=length,
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", matched=matched,
                   configs=configs)
    with open(os.path.join(args.out, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(args.out, "summary.json.tmp"), os.path.join(args.out, "summary.json"))
    print(markdown_table(configs))
    largest = f"k{ks[-1]}"
    columns = [BASELINE] + ([largest] if largest != BASELINE else []) + \
        ([matched[largest]] if matched.get(largest, BASELINE) != BASELINE else [])
    grid_sheet(results, columns, min(GRID_JOBS, len(jobs)), os.path.join(args.out, "grid.png"))
    print(f"wrote {args.out}/summary.json, grid.png and images/ ({len(results)} configurations x {len(jobs)} jobs)")
    return summary


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
