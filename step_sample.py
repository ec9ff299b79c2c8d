"""Step-wise Sampling (PAPER.md section 4): training-free guidance by the DRM.

At each denoising step, from the current latent draw k candidates of Flow-GRPO's SDE step (one mean, k noises),
score all k with the DRM at their own timestep (1000 * sigma_next), keep the best, continue. k = 1 is plain SDE
sampling; k = 1 with --noise-level 0 is the Euler ODE sampler of diffusers' StableDiffusion3Pipeline, image for
image. --best-of-n N is the baseline: N whole trajectories (k = 1) per prompt, the DRM picks the best final image.
--scorer oracle (toy world only) lets the exact oracle choose instead of the DRM: a candidate at noise level sigma
is scored on the one-step prediction of its clean latent, x - sigma * v (conditional velocity), decoded: what a
perfect reward model would give the same algorithm (its upper bound), at one extra transformer forward per
candidate.

Departures from the paper: when the DRM is frozen over the generator's own transformer (one copy in memory) and
uses the same prompt embeddings, the chosen candidate's prefix activations are exactly what the next step's
conditional forward computes up to block N - m, so they are reused instead of recomputed (--no-reuse turns it off).

    python step_sample.py --prompt "a red circle left of a blue square" --grid --out runs/samples  # toy/assets/
    python step_sample.py --model /models/sd3.5-medium --drm runs/drm/drm.safetensors --prompts prompts.txt \\
        --k 6 --height 512 --width 512 --out runs/samples-k6
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data import UserError, read_prompts
from model import (compile_blocks, decode_latents, default_sequence_length, encode_prompts, inference_dtype,
                   load_drm, load_pipeline, score_images, sde_step, transformer_suffix)
from toy.world import score_tensor, vocabulary_problem

TOY_MODEL, TOY_DRM = "toy/assets/pipeline", "toy/assets/drm.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=TOY_MODEL, help="SD3/SD3.5 diffusers folder")
    p.add_argument("--drm", help=f"DRM checkpoint (needed for k > 1 and --best-of-n; default: {TOY_DRM} over the "
                   "toy pipeline, none otherwise)")
    p.add_argument("--scorer", default="drm", choices=("drm", "oracle"), help="who chooses: the DRM, or (toy "
                   "prompts only) the toy oracle on each candidate's predicted clean image")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    p.add_argument("--prompts", default="", help="prompt file (.txt one a line, or .jsonl with 'prompt')")
    p.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the paper: 50)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (1: off)")
    p.add_argument("--k", type=int, default=4, help="SDE candidates per step; 1 = no selection")
    p.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level a; 0 = Euler ODE")
    p.add_argument("--branch-steps", default="", help="'START:END': branch only at steps START..END-1")
    p.add_argument("--best-of-n", type=int, default=0, help="baseline: N plain trajectories, keep the DRM's best")
    p.add_argument("--height", type=int, default=0, help="image height (0: the pipeline's default size)")
    p.add_argument("--width", type=int, default=0, help="image width (0: the pipeline's default size)")
    p.add_argument("--max-sequence-length", type=int, default=0, help="T5 tokens of the generator's prompts (0: the "
                   "pipeline's, at most 256); the DRM always reads the length it was trained with (recorded in our "
                   "files; 512 for the authors')")
    p.add_argument("--drm-skip-last-blocks", type=int, default=None, help="m of an authors' DRM file (default: 3 "
                   "over 24 blocks, 5 over 38; our files record it)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--no-reuse", action="store_true", help="do not reuse the DRM's prefix activations")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (generator and "
                   "DRM); the first batch pays the compile time")
    p.add_argument("--grid", action="store_true", help="also write grid.png: k=1 vs k (or best-of-N) on the same "
                   "seeds")
    p.add_argument("--out", default="runs/samples", help="output folder: PNGs and results.jsonl")
    args = p.parse_args(argv)
    if args.drm is None:  # the toy pipeline comes with its DRM
        args.drm = TOY_DRM if os.path.normpath(args.model) == os.path.normpath(TOY_MODEL) else ""
    return args


# ----------------------------------------------------------------------------------------------------------------
# The math

def select_best(candidates, scores):
    """candidates (B, k, C, H, W), scores (B, k) -> the best candidate of each row (B, C, H, W) and its score."""
    best = scores.argmax(dim=1)  # (B,)
    rows = torch.arange(len(best), device=best.device)
    return candidates[rows, best], scores[rows, best]


def sde_candidates(v, x, sigma, sigma_next, noise_level, eps):
    """k SDE samples per latent from one mean: x, v (B, C, H, W), eps (B * k, C, H, W) -> (B * k, C, H, W)."""
    _, _, mean, std = sde_step(v, x, sigma, sigma_next, noise_level, x_next=x)  # x_next given: nothing drawn
    k = len(eps) // len(x)
    return mean.repeat_interleave(k, 0) + std.repeat_interleave(k, 0) * eps


def velocity(transformer, x, t, embeds, pooled, guidance, cached=None, first_block=0, detach_uncond=False):
    """Classifier-free-guided velocity. embeds/pooled hold [negative; positive] (2B, ...) when guidance > 1.
    `cached` = (hidden, temb, context) of the positive branch after `first_block` blocks, reused when given.
    detach_uncond: no gradient through the unconditional branch (Flow-GRPO's loss with CFG)."""
    b, h, w = len(x), *x.shape[-2:]
    timestep = t.expand(b)
    if guidance <= 1:
        if cached is not None:
            return transformer_suffix(transformer, cached[0], cached[2], cached[1], first_block, h, w)
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
    if cached is None:
        v = transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * b), encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False)[0]
        v_uncond, v_cond = v.chunk(2)
    else:
        v_uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds[:b],
                               pooled_projections=pooled[:b], return_dict=False)[0]
        v_cond = transformer_suffix(transformer, cached[0], cached[2], cached[1], first_block, h, w)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance * (v_cond - v_uncond)


def predicted_clean(transformer, x, sigma, embeds, pooled):
    """One-step prediction of the clean latent from x (N, C, h, w) at noise level sigma: x - sigma * v."""
    if float(sigma) == 0:
        return x
    v = velocity(transformer, x, torch.as_tensor(1000 * sigma, device=x.device).float(), embeds, pooled, 1.0)
    return x - sigma * v.float()


@torch.no_grad()
def step_sample(pipe, drm, prompts, seeds, k=4, steps=50, guidance=4.5, noise_level=0.7, height=512, width=512,
                branch_steps=None, max_sequence_length=256, reuse=True, return_latents=False, oracle=False,
                drm_sequence_length=None):
    """Images (B, 3, H, W) in [-1, 1] and, per image, the chosen DRM score at each branching step (and the final
    latents, with return_latents). oracle=True: the toy oracle on the candidates' predicted clean images chooses
    instead of the DRM (drm may be None). The generator's prompts are encoded with max_sequence_length T5 tokens,
    the DRM's with drm_sequence_length (None: the same); when they differ the DRM's prefix activations cannot stand
    in for the generator's, and are not reused."""
    device, dtype, transformer = pipe.transformer.device, pipe.transformer.dtype, pipe.transformer
    b, cfg = len(prompts), guidance > 1
    # 1. Prompt embeddings ([negative; positive] with CFG) and the initial latents, drawn as the pipeline draws them.
    pos, neg, pos_pooled, neg_pooled = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
        max_sequence_length=max_sequence_length)
    embeds, pooled = (torch.cat([neg, pos]), torch.cat([neg_pooled, pos_pooled])) if cfg else (pos, pos_pooled)
    own_length = drm_sequence_length in (None, max_sequence_length)
    drm_pos, drm_pooled = (pos, pos_pooled) if own_length or drm is None else \
        encode_prompts(pipe, prompts, drm_sequence_length)  # the DRM reads the length it was trained with
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = pipe.prepare_latents(b, transformer.config.in_channels, height, width, dtype, device, generators).float()
    noise_generators = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]
    pipe.scheduler.set_timesteps(steps, device=device)
    sigmas = pipe.scheduler.sigmas.float()  # (steps + 1,), from 1 to 0
    start, end = branch_steps or (0, steps)
    can_reuse = reuse and own_length and not oracle and drm is not None and drm.mode == "frozen" and \
        drm.transformer is transformer
    cached, history = None, [[] for _ in range(b)]

    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # 2. One guided transformer forward for the current latents (the CFG pair batched together).
        v = velocity(transformer, x.to(dtype), 1000 * sigma, embeds, pooled, guidance, cached, drm.prefix_blocks
                     if cached is not None else 0).float()
        cached = None
        width_k = k if start <= i < end else 1
        # 3. k candidates per latent from one mean: the SDE step with k independent noises.
        eps = torch.cat([torch.randn((width_k, *x.shape[1:]), generator=g) for g in noise_generators]).to(device)
        candidates = sde_candidates(v, x, sigma, sigma_next, noise_level, eps)  # (B * k, C, H, W)
        if width_k == 1:
            x = candidates
            continue
        # 4. One batched DRM forward over all B * k candidates at their own timestep; keep the argmax per latent.
        if oracle:
            c_embeds, c_pooled = pos.repeat_interleave(k, 0), pos_pooled.repeat_interleave(k, 0)
            clean = predicted_clean(transformer, candidates.to(dtype), sigma_next, c_embeds, c_pooled)
            scores = score_tensor(decode_latents(pipe.vae, clean), [q for q in prompts for _ in range(k)])
            scores = scores.view(b, k)  # (B, k)
        else:
            t_next = (1000 * sigma_next).expand(b * k)  # the same float the next step's forward is given
            c_embeds, c_pooled = drm_pos.repeat_interleave(k, 0), drm_pooled.repeat_interleave(k, 0)
            hidden, temb, context = drm.prefix(candidates.to(dtype), t_next, c_embeds, c_pooled, return_context=True)
            scores = drm.score_prefix(hidden, temb, *x.shape[-2:]).view(b, k)  # (B, k)
        x, best_scores = select_best(candidates.view(b, k, *x.shape[1:]), scores)
        for row, score in enumerate(best_scores.tolist()):
            history[row].append(round(score, 5))
        if can_reuse and i + 1 < steps:
            best = scores.argmax(dim=1) + torch.arange(b, device=device) * k  # (B,) rows of the chosen candidates
            cached = (hidden[best], temb[best], context[best])
    images = decode_latents(pipe.vae, x)
    return (images, history, x) if return_latents else (images, history)


def final_scores(drm, pipe, prompts, images, max_sequence_length, oracle=False):
    """Clean-image DRM scores (t = 0, VAE mean) of decoded images in [-1, 1] (the toy oracle's with oracle=True)."""
    if oracle:
        return score_tensor(images, prompts).tolist()
    embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length)
    return score_images(drm, pipe.vae, images, embeds, pooled).tolist()


BEST_OF_N_SEED_STRIDE = 7919  # best-of-N: trial i of the job with seed s starts from seed s + 7919 i


@torch.no_grad()
def best_of_n(pipe, drm, prompts, seeds, n, max_sequence_length=256, oracle=False, drm_sequence_length=None,
              **sampling):
    """The baseline: n plain trajectories (k = 1) per job, trial i from seed + 7919 i; keep the image the DRM (the
    toy oracle, with oracle=True) scores highest at t = 0 (the earlier one on a tie). -> images (B, 3, H, W),
    scores [B], per-step histories [B]."""
    best_images, best_scores, best_history = None, None, None
    for trial in range(n):
        trial_seeds = [s + BEST_OF_N_SEED_STRIDE * trial for s in seeds]
        images, history = step_sample(pipe, drm, prompts, trial_seeds, k=1, max_sequence_length=max_sequence_length,
                                      drm_sequence_length=drm_sequence_length, **sampling)
        scores = final_scores(drm, pipe, prompts, images, drm_sequence_length or max_sequence_length, oracle)
        if best_images is None:
            best_images, best_scores, best_history = images.clone(), list(scores), list(history)
            continue
        for row in range(len(prompts)):
            if scores[row] > best_scores[row]:
                best_images[row], best_scores[row], best_history[row] = images[row], scores[row], history[row]
    return best_images, best_scores, best_history


def to_pil(image):
    """(3, H, W) in [-1, 1] -> PIL image."""
    return Image.fromarray(((image.float().permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255)
                           .astype(np.uint8))


def save_png(image, path):
    to_pil(image).save(path)


def save_grid(rows, path):
    """rows of (image (3, H, W) in [-1, 1], score, oracle or None) cells -> one PNG, each cell captioned below."""
    from PIL import ImageDraw
    h, w = rows[0][0][0].shape[-2:]
    cell_w = max(w, 72)  # room for the caption
    sheet = Image.new("RGB", (len(rows[0]) * cell_w, len(rows) * (h + 12)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (image, score, truth) in enumerate(row):
            sheet.paste(to_pil(image), (c * cell_w, r * (h + 12)))
            caption = "" if score is None else f"{score:+.2f}" + ("" if truth is None else f" o{truth:.2f}")
            draw.text((c * cell_w + 1, r * (h + 12) + h), caption, fill="black")
    sheet.save(path)


def check_args(args):
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance < 1 or args.noise_level < 0:  # diffusers runs a scale below 1 as 1: a mistake, not a setting
        raise UserError(f"--guidance {args.guidance} must be >= 1 (1: no CFG), --noise-level {args.noise_level} >= 0")
    if args.images_per_prompt < 1 or args.batch_size < 1 or args.best_of_n < 0:
        raise UserError("--images-per-prompt and --batch-size must be >= 1, --best-of-n >= 0")
    if (args.k > 1 or args.best_of_n) and not args.drm and args.scorer == "drm":
        raise UserError("--drm is required for --k > 1 and --best-of-n (the DRM chooses; or --scorer oracle on toy "
                        "prompts)")
    if not args.prompt and not args.prompts:
        raise UserError("give --prompt TEXT or --prompts FILE")
    if args.branch_steps:
        try:
            start, end = (int(v) for v in args.branch_steps.split(":"))
        except ValueError:
            raise UserError(f"--branch-steps {args.branch_steps}: expected START:END") from None
        if not 0 <= start < end <= args.steps:
            raise UserError(f"--branch-steps {args.branch_steps}: need 0 <= START < END <= --steps {args.steps}")


def main(args):
    check_args(args)
    prompts = args.prompt + (read_prompts(args.prompts) if args.prompts else [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, dtype=inference_dtype(args.model, device), device=device)
    multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    default_size = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = args.height or default_size, args.width or default_size
    if height % multiple or width % multiple:
        raise UserError(f"--height {height} / --width {width} must be divisible by {multiple} for {args.model}")
    oracle = args.scorer == "oracle"
    problem = vocabulary_problem(prompts)  # toy-world prompts also get the oracle's score of each final image
    if oracle and problem:
        raise UserError(f"--scorer oracle scores toy-world prompts only: {problem}")
    toy = problem is None
    drm, config = load_drm(args.drm, pipe.transformer, args.drm_skip_last_blocks) if args.drm and not oracle \
        else (None, {})
    if args.compile:
        compile_blocks(pipe.transformer)
    length = args.max_sequence_length or default_sequence_length(pipe)
    drm_length = config.get("max_sequence_length", length)  # the DRM reads its own training length
    if drm is not None and drm_length != length and not args.no_reuse and drm.mode == "frozen":
        print(f"the DRM reads {drm_length} T5 tokens, the generator {length}: its prefix activations are not reused "
              f"(--max-sequence-length {drm_length} keeps the reuse)")
    branch = tuple(int(v) for v in args.branch_steps.split(":")) if args.branch_steps else None
    os.makedirs(args.out, exist_ok=True)

    # Every (prompt, seed) job; best-of-N draws N plain trajectories per job and keeps the DRM's favourite.
    jobs = [(p, args.seed + j) for p in prompts for j in range(args.images_per_prompt)]
    chosen = f"best-of-{args.best_of_n}" if args.best_of_n else f"k={args.k}"
    with_grid = args.grid and (args.k > 1 or args.best_of_n > 1)
    runs = [("k", chosen)] + ([("k1", "k=1")] if with_grid else [])
    sampling = dict(steps=args.steps, guidance=args.guidance, noise_level=args.noise_level, height=height,
                    width=width, branch_steps=branch, max_sequence_length=length, reuse=not args.no_reuse,
                    oracle=oracle, drm_sequence_length=drm_length)
    results, grid, totals = [], {}, {name: [] for name, _ in runs}
    for name, label in runs:
        for start in tqdm(range(0, len(jobs), args.batch_size), desc=label):
            batch = jobs[start:start + args.batch_size]
            batch_prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
            if name == "k" and args.best_of_n:
                images, scores, history = best_of_n(pipe, drm, batch_prompts, seeds, args.best_of_n, **sampling)
            else:
                images, history = step_sample(pipe, drm, batch_prompts, seeds, args.k if name == "k" else 1,
                                              **sampling)
                scores = final_scores(drm, pipe, batch_prompts, images, drm_length, oracle) if drm or oracle \
                    else [None] * len(batch)
            truth = score_tensor(images, batch_prompts).tolist() if toy and not oracle else [None] * len(batch)
            for row, (prompt, seed) in enumerate(batch):
                index = start + row
                path = os.path.join(args.out, f"{name}_{index:05d}.png")
                save_png(images[row], path)
                totals[name].append((scores[row], truth[row]))
                if with_grid:
                    grid.setdefault(index, {})[name] = (images[row].cpu(), scores[row], truth[row])
                chosen_method = name == "k"  # else the grid's plain k = 1 sample of the same job
                results.append(dict(prompt=prompt, seed=seed, k=args.k if chosen_method and not args.best_of_n else 1,
                                    best_of_n=args.best_of_n if chosen_method and args.best_of_n else None,
                                    **{f"{args.scorer}_score": scores[row]},
                                    **({"oracle_score": truth[row]} if truth[row] is not None else {}),
                                    step_scores=history[row], file=path))
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    if with_grid:  # one row per image: plain sampling (k = 1) left, the chosen method (k, or best-of-N) right
        save_grid([[grid[i]["k1"], grid[i]["k"]] for i in sorted(grid)], os.path.join(args.out, "grid.png"))
    for name, label in runs:  # mean final scores of each method over the same jobs
        means = [np.mean(v) if v[0] is not None else None for v in zip(*totals[name])]
        print(f"{label}: " + ", ".join(f"mean {who} {m:.3f}" for who, m in zip((args.scorer, "oracle"), means)
                                       if m is not None))
    print(f"wrote {len(results)} images and results.jsonl to {args.out}")
    return results


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
