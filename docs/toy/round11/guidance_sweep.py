"""Oracle of base samples on the held-out prompts against the CFG scale (docs/toy/README.md, round 11).

One sample per held-out prompt (seed 123 + prompt index, 20 steps) per pipeline and guidance scale; prints the mean,
sd and oracle terms, writes them as JSONL, and a contact sheet of the first pipeline: --sheet-prompts held-out
prompts, 4 seeds each, one column group per guidance, captioned with the oracle.

    python docs/toy/round11/guidance_sweep.py --pipelines toy/assets/pipeline --guidance 1,4.5 --out /tmp/sweep
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from diffusers import StableDiffusion3Pipeline  # noqa: E402

from toy import world  # noqa: E402
from toy.build import sample  # noqa: E402


def sheet(columns, prompts, path, seeds):
    """columns: {guidance: (images, oracle)} with len(prompts) * seeds images each, prompt-major."""
    cell, caption = 96, 14
    width = len(columns) * seeds * cell
    img = Image.new("RGB", (width, 16 + len(prompts) * (cell + caption)), "white")
    draw = ImageDraw.Draw(img)
    for c, (g, (images, oracle)) in enumerate(columns.items()):
        draw.text((c * seeds * cell + 2, 2), f"guidance {g}", fill="black")
        for i, (pixels, o) in enumerate(zip(images, oracle)):
            r, s = divmod(i, seeds)
            x, y = (c * seeds + s) * cell, 16 + r * (cell + caption)
            img.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + 2, y + cell), f"o={o:.2f}", fill="black")
            if s == 0 and c == 0:
                draw.text((x + 2, y + 2), prompts[r][:30], fill="black")
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", required=True, help="toy pipeline folders, comma-separated")
    p.add_argument("--guidance", default="1,1.5,4.5", help="CFG scales, comma-separated")
    p.add_argument("--sheet-prompts", type=int, default=8, help="held-out prompts on the contact sheet (0: none)")
    p.add_argument("--out", required=True, help="folder for sweep.jsonl and sheet.png")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _, test = world.split_prompts()
    scales = [float(g) for g in args.guidance.split(",")]
    for n, folder in enumerate(args.pipelines.split(",")):
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
        for g in scales:
            t0 = time.time()
            images = sample(pipe, test, seed=123, steps=20, guidance=g, batch=len(test))
            oracle = np.asarray(world.score(images, test))
            terms = {k: round(float(np.mean(v)), 3) for k, v in world.score_terms(images, test).items()}
            row = dict(pipeline=folder, guidance=g, n=len(test), mean=round(float(oracle.mean()), 4),
                       sd=round(float(oracle.std()), 4), terms=terms, seconds=round(time.time() - t0))
            print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "sweep.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if n == 0 and args.sheet_prompts:
            chosen = [test[i] for i in np.linspace(0, len(test) - 1, args.sheet_prompts).round().astype(int)]
            repeated = [q for q in chosen for _ in range(4)]
            columns = {}
            for g in scales:
                images = sample(pipe, repeated, seed=7, steps=20, guidance=g, batch=len(repeated))
                columns[g] = (images, world.score(images, repeated))
            sheet(columns, chosen, os.path.join(args.out, "sheet.png"), 4)


if __name__ == "__main__":
    main()
