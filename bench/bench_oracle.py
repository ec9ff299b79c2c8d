"""Speed of the toy world's oracle (toy/world.py `score`) on ONE CPU core, and what it says about every degradation.

Speed: `score` on a batch of 1,000 clean 64x64 renders of random prompts, given as a uint8 array (N, 64, 64, 3) and
as a list of PIL images (which adds the conversion to an array). The process is pinned to one core and numpy's
thread pools to one thread (set before numpy loads). The first call is timed apart (cold caches, first page faults);
then --repeats timed calls, whose median is the figure reported.

Quality: the mean oracle score of --quality_images clean renders of random prompts (seed 0), and of the same renders
degraded by each kind at several strengths (with the prompt), with the share of images that score below their clean
render.

    python bench/bench_oracle.py                    # ~10 s; writes bench/results/oracle.json
    python bench/bench_oracle.py --batch 5000 --repeats 3
"""
import os

for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[name] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import world  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=1000, help="images per timed `score` call")
parser.add_argument("--repeats", type=int, default=7, help="timed calls after the first (cold) one")
parser.add_argument("--quality_images", type=int, default=500, help="renders behind the quality table")
parser.add_argument("--strengths", default="0.1,0.25,0.5,1.0", help="comma list of degradation strengths")
parser.add_argument("--out", default="bench/results/oracle.json", help="where the JSON results go")
args = parser.parse_args()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def random_scenes(n, seed):
    rng = np.random.default_rng(seed)
    prompts = world.all_prompts()
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    return chosen, [world.render(p, rng) for p in chosen], rng


def time_score(images, prompts):
    start = time.perf_counter()
    world.score(images, prompts)
    return time.perf_counter() - start


if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
meta = dict(what="toy/world.py score(images, prompts) on one CPU core, 64x64 renders of random prompts",
            cpu=cpu_model(), cores_used=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            numpy=np.__version__, python=platform.python_version(), batch=args.batch, repeats=args.repeats,
            command=" ".join(["python bench/bench_oracle.py", *sys.argv[1:]]))
print(f"# {meta['what']}\n# {meta['cpu']}, numpy {np.__version__}, batch {args.batch}, {args.repeats} timed calls")

# 1. Speed.
prompts, images, _ = random_scenes(args.batch, seed=1)
array = np.stack([np.asarray(im) for im in images])  # (N, 64, 64, 3) uint8
speed = {}
for label, batch in (("uint8 array", array), ("list of PIL images", images)):
    cold = time_score(batch, prompts)
    times = [time_score(batch, prompts) for _ in range(args.repeats)]
    speed[label] = dict(cold_s=cold, median_s=statistics.median(times), min_s=min(times),
                        images_per_s=args.batch / statistics.median(times), cold_images_per_s=args.batch / cold)
    print(f"{label:>20}: {speed[label]['images_per_s']:8.0f} images/s (median of {args.repeats}; "
          f"first call {speed[label]['cold_images_per_s']:.0f} images/s)")

# 2. Quality: clean vs degraded.
strengths = [float(s) for s in args.strengths.split(",")]
prompts, images, rng = random_scenes(args.quality_images, seed=0)
clean = world.score(images, prompts)
quality = dict(clean=dict(mean=float(clean.mean()), min=float(clean.min())))
print(f"\n{'clean':>10}: mean {clean.mean():.3f}, min {clean.min():.3f}  ({args.quality_images} random prompts)")
print(f"{'strength':>10}: " + "".join(f"{s:>17}" for s in strengths) + "   (mean score, share below clean)")
for kind in world.DEGRADATIONS:
    quality[kind] = {}
    for strength in strengths:
        worse = world.score([world.degrade(im, kind, rng, strength, prompt=p) for im, p in zip(images, prompts)],
                            prompts)
        quality[kind][str(strength)] = dict(mean=float(worse.mean()), lower_than_clean=float((worse < clean).mean()))
    cells = [f"{q['mean']:11.3f} ({q['lower_than_clean']:4.0%})" for q in quality[kind].values()]
    print(f"{kind:>10}: " + "".join(cells))

os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out + ".tmp", "w") as f:
    json.dump(dict(meta=meta, speed=speed, quality=quality), f, indent=1)
os.replace(args.out + ".tmp", args.out)
print(f"\nwrote {args.out}")
