"""Measure a toy-world DRM against the oracle on held-out prompts.

1. Pairwise accuracy (winner = higher oracle) at sigma = 0 (clean, t = 0) and 0.25, 0.5, 0.75, 0.9 (both images
   noised independently to sigma, fixed noise), with the number of pairs and a 95% Wilson interval; for all pairs
   and for confident ones (oracle gap >= 0.15, confidence >= 0.95: the pairs the DRM was trained on).
   Confident pairs are also split by the oracle term that decided them (the factor whose log differs most), with
   the clean accuracy on each: which checks the DRM has learned.
2. Spearman correlation between the clean DRM score and the oracle over the base samples, with a 95% interval
   (Fisher z).
3. A contact sheet: samples of a few held-out prompts, each labelled with its oracle and DRM scores.

    python -m toy.evaluate --pipeline toy/assets/pipeline --drm toy/assets/drm.safetensors \\
        --pairs runs/toy/prefs/test.json --out docs/toy
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import load_image, read_records  # noqa: E402
from model import encode_images, encode_prompts, load_drm, load_pipeline  # noqa: E402
from toy import world  # noqa: E402

SIGMAS = (0.0, 0.25, 0.5, 0.75, 0.9)
TERMS = ("presence", "shape", "purity", "placement", "sharpness", "background")  # the oracle's factors


def wilson(correct, n, z=1.96):
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def deciding_terms(terms, win, lose, names=TERMS):
    """Per pair, the oracle term whose log differs most between winner and loser: what decided the pair."""
    logs = np.log(np.stack([terms[k] for k in names]) + 1e-3)  # (K, N images)
    return np.array(names)[np.abs(logs[:, win] - logs[:, lose]).argmax(0)]


def spearman(a, b):
    """Spearman's rho (average ranks for ties) and a 95% interval from Fisher's z."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    rho = float(np.corrcoef(ra, rb)[0, 1])
    z, se = math.atanh(min(max(rho, -0.9999), 0.9999)), 1 / math.sqrt(max(len(a) - 3, 1))
    return round(rho, 4), (round(math.tanh(z - 1.96 * se), 4), round(math.tanh(z + 1.96 * se), 4))


@torch.no_grad()
def drm_scores(drm, pipe, latents, prompts, sigma, generator, length, batch=256):
    """DRM scores of latents noised to sigma (fixed generator), batched; prompts encoded with `length` T5 tokens."""
    out = []
    for i in range(0, len(latents), batch):
        x0, chunk = latents[i:i + batch], prompts[i:i + batch]
        embeds, pooled = encode_prompts(pipe, chunk, length)
        noise = torch.randn(x0.shape, generator=generator)  # on the CPU: the same noise on every device
        x = ((1 - sigma) * x0 + sigma * noise).to(embeds.device)
        out.append(drm(x, torch.full((len(x0),), 1000 * sigma, device=x.device), embeds, pooled).float().cpu())
    return torch.cat(out).numpy()


def contact_sheet(images, prompts, oracle, drm, path, per_row):
    """A grid, one prompt a row, each image captioned 'o=oracle d=drm'."""
    rows = math.ceil(len(images) / per_row)
    cell, caption = 96, 14
    sheet = Image.new("RGB", (per_row * cell, rows * (cell + caption) + 2), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        r, c = divmod(i, per_row)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (c * cell, r * (cell + caption)))
        draw.text((c * cell + 2, r * (cell + caption) + cell), f"o={oracle[i]:.2f} d={drm[i]:+.2f}", fill="black")
        if c == 0:
            draw.text((2, r * (cell + caption) + 2), prompts[i][:30], fill="black")
    sheet.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="toy/assets/pipeline", help="toy pipeline folder")
    p.add_argument("--drm", default="toy/assets/drm.safetensors", help="DRM checkpoint")
    p.add_argument("--pairs", required=True, help="held-out pairs JSON written by toy.build (prefs/test.json)")
    p.add_argument("--out", default="docs/toy", help="where results.json and contact_sheet.png go")
    p.add_argument("--sheet-prompts", type=int, default=8, help="prompts on the contact sheet")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 on either: the scores agree to ~1e-4
    pipe = load_pipeline(args.pipeline, device=device)
    drm, config = load_drm(args.drm, pipe.transformer)  # config: the DRM's own T5 length
    drm.float().to(device).eval()

    # The distinct held-out samples behind the pairs, their oracle scores and clean latents.
    records, folder = read_records(args.pairs), os.path.dirname(os.path.abspath(args.pairs))
    paths = sorted({r[k] for r in records for k in ("path1", "path2")})
    prompt_of = {r[k]: r["prompt"] for r in records for k in ("path1", "path2")}
    index = {path: i for i, path in enumerate(paths)}
    pixels = torch.stack([load_image(os.path.join(folder, path), world.SIZE) for path in paths])
    images = ((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    prompts = [prompt_of[path] for path in paths]
    oracle = world.score(images, prompts)
    latents = torch.cat([encode_images(pipe.vae, pixels[i:i + 256]).float().cpu()
                         for i in range(0, len(pixels), 256)])

    results = dict(samples=len(paths), pairs=len(records))
    win = np.array([index[r["path1"]] for r in records])
    lose = np.array([index[r["path2"]] for r in records])
    gap = oracle[win] - oracle[lose]
    confident = gap >= 0.15
    clean = None
    for sigma in SIGMAS:
        scores = drm_scores(drm, pipe, latents, prompts, sigma, torch.Generator().manual_seed(1234),
                            config["max_sequence_length"])
        clean = scores if sigma == 0 else clean
        right = scores[win] > scores[lose]
        results[f"sigma={sigma:g}"] = dict(
            acc=round(float(right.mean()), 4), n=int(len(right)), ci95=wilson(int(right.sum()), len(right)),
            acc_confident=round(float(right[confident].mean()), 4), n_confident=int(confident.sum()),
            ci95_confident=wilson(int(right[confident].sum()), int(confident.sum())))
        print(f"sigma {sigma:g}: {results[f'sigma={sigma:g}']}", flush=True)
    # What decided each confident pair, and the clean DRM's accuracy on each kind: which checks it has learned.
    decided = deciding_terms(world.score_terms(images, prompts), win, lose)
    right = clean[win] > clean[lose]
    results["by_deciding_term"] = {}
    for term in TERMS:
        mask = confident & (decided == term)
        if mask.any():
            results["by_deciding_term"][term] = dict(
                n=int(mask.sum()), share=round(float(mask.sum() / confident.sum()), 4),
                acc=round(float(right[mask].mean()), 4), ci95=wilson(int(right[mask].sum()), int(mask.sum())))
    print(f"confident pairs by deciding oracle term (sigma 0): {results['by_deciding_term']}", flush=True)
    rho, ci = spearman(clean, oracle)
    results["spearman"] = dict(rho=rho, ci95=ci, n=len(oracle))
    results["oracle_base"] = dict(mean=round(float(oracle.mean()), 4), std=round(float(oracle.std()), 4))
    print(f"spearman(DRM, oracle) = {rho} {ci} over {len(oracle)} held-out samples", flush=True)

    # Contact sheet: the first samples of a few held-out prompts, sorted by oracle within a row.
    chosen = []
    for prompt in sorted(set(prompts))[:: max(len(set(prompts)) // args.sheet_prompts, 1)][:args.sheet_prompts]:
        rows = sorted([i for i, q in enumerate(prompts) if q == prompt], key=lambda i: -oracle[i])
        chosen += rows
    per_row = max(sum(q == prompts[chosen[0]] for q in prompts), 1)
    contact_sheet(images[chosen], [prompts[i] for i in chosen], oracle[chosen], clean[chosen],
                  os.path.join(args.out, "contact_sheet.png"), per_row)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
