"""Does Step-wise GRPO converge faster than terminal-reward GRPO? The toy-world check of PAPER.md section 3's claim
(2.5x fewer steps and ~3.5x fewer GPU-hours than GRPO with the same DRM; even k = 2 beats GRPO).

1. Run: every configuration x seed is one `step_grpo.py` run (a subprocess, one at a time, on the visible device)
   with the same training-time budget (--max-minutes; evaluations do not count), --cfg-in-loss, an evaluation
   every --eval-every steps on the toy held-out prompts (oracle score, and DRM score where the run has a DRM), and
   the same --extra flags:
       step_k2_best    --mode step --k 2 --continue best     step_k4_best    --mode step --k 4 --continue best
       step_k4_random  --mode step --k 4 --continue random   grpo            --mode grpo --group G (same DRM)
       grpo_oracle     --mode grpo --group G --reward oracle (no DRM: GRPO on the true reward)
       step_k2_oracle  step_k4_oracle: step mode, --continue best, the oracle on each candidate's clean prediction
                       (no DRM: dense rewards without the DRM's errors; their baseline is grpo_oracle)
2. Summarise (OUT/summary.json, a markdown table, OUT/oracle.png and OUT/drm.png with the seed-mean curves,
   OUT/before_after.png with the first seed's evaluation samples of every configuration at step 0 and at the end):
   per configuration the seed-mean of the first evaluation (step 0: the base model) and the final one, with a 95%
   t-interval over seeds, the gain (final minus first, paired by seed, with its interval) and the final minus the
   baseline's final (paired by seed: the comparison's own difference, with its interval); the speed-up: the
   baseline's steps (and device-seconds) to reach the baseline's final oracle score, divided by this
   configuration's (baseline: grpo if it runs, else grpo_oracle; --baseline sets it); a reward-hacking flag per
   run (DRM score up while the oracle's fell by more than 0.02).

Choices to know:
- step_grpo.py evaluates the base model at step 0, so "first" is the base (the same for every configuration of a
  seed) and the gain is the improvement over it. Runs made before that evaluation existed start at --eval-every.
- Seed-mean curves run up to the last step of a configuration's shortest seed (--max-minutes stops seeds at
  different steps), every seed linearly interpolated at every evaluation step there. grpo's target is the last
  point of its own seed-mean curve, so grpo reaches it (its speed-up is 1); the "final" columns instead average
  each seed's own last evaluation.
- A run is done when its folder has done.json, written once step_grpo.py exited 0 after a final evaluation
  (metrics.jsonl alone cannot tell a final evaluation from a periodic one). Unfinished runs go on with --resume
  latest; step_grpo.py counts the training time before its checkpoint towards --max-minutes.
- One device, one run at a time: runs compared at equal time need equal hardware. Relative paths in --extra
  are read from the repository root.
- If grpo ends no higher than the base model, the target is reached at step 0 and no speed-up is computed (-).
- A configuration that reaches the target at its first evaluation after step 0 gets a speed-up bounded by the
  evaluation grid: the true one may be larger (a smaller --eval-every resolves it).

    python -m toy.compare_grpo --drm toy/assets/drm.safetensors --out runs/compare --minutes 2 --seeds 0,1,2
    python -m toy.compare_grpo --drm toy/assets/drm.safetensors --configs step_k2_best,grpo \\
        --extra "--prompts-per-step 16 --lr 1e-4" --out runs/compare_lr
"""
import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import UserError  # noqa: E402
from plot import plot_runs, read_metrics  # noqa: E402

CONFIGS = {  # name -> its own step_grpo.py flags (the common ones are added in run_flags)
    "step_k2_best": ["--mode", "step", "--k", "2", "--continue", "best"],
    "step_k4_best": ["--mode", "step", "--k", "4", "--continue", "best"],
    "step_k4_random": ["--mode", "step", "--k", "4", "--continue", "random"],
    "grpo": ["--mode", "grpo"],
    "grpo_oracle": ["--mode", "grpo", "--reward", "oracle"],
    "step_k2_oracle": ["--mode", "step", "--k", "2", "--continue", "best", "--reward", "oracle"],
    "step_k4_oracle": ["--mode", "step", "--k", "4", "--continue", "best", "--reward", "oracle"],
}
HACKING_ORACLE_DROP = 0.02  # the oracle's fall (first to last evaluation) that counts as real, not noise
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SET_PER_RUN = ("--out", "--seed", "--max-minutes", "--eval-every", "--resume", "--mode", "--k", "--continue",
               "--group", "--reward", "--drm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drm", default=os.path.join(ROOT, "toy", "assets", "drm.safetensors"),
                   help="DRM checkpoint of the DRM-reward configurations (all but the oracle ones; default: the "
                   "shipped one)")
    p.add_argument("--out", default="runs/compare", help="output folder: a folder NAME_sSEED per run, summary.json, "
                                                         "oracle.png, drm.png")
    p.add_argument("--minutes", type=float, default=2.0, help="training time of every run (--max-minutes)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: one run per configuration each")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--group", type=int, default=4, help="grpo configurations: trajectories per prompt (4 samples "
                                                        "as many latents per prompt as k = 4)")
    p.add_argument("--baseline", default="", help="the configuration whose final oracle score is the target of the "
                   "speed-ups (default: grpo if it runs, else grpo_oracle)")
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every N steps: the points of the curves")
    p.add_argument("--extra", default="", help="more step_grpo.py flags for every run, one quoted string, e.g. "
                                               "\"--prompts-per-step 16 --lr 1e-4\"")
    return p.parse_args(argv)


def needs_drm(name):
    return "oracle" not in CONFIGS[name]


def check_args(args):
    """-> (configurations, seeds, extra flags, baseline), or one UserError naming the flag."""
    if not args.minutes > 0:
        raise UserError(f"--minutes {args.minutes}: must be > 0 (step_grpo.py reads 0 as no time limit)")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: give one or more distinct seeds, e.g. 0,1,2")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise UserError(f"--configs {args.configs!r}: unknown configuration {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(CONFIGS)}")
    baseline = args.baseline or ("grpo" if "grpo" in configs else "grpo_oracle")
    if args.baseline and baseline not in configs:
        raise UserError(f"--baseline {baseline!r}: not among --configs {','.join(configs)}")
    scored_by_drm = [c for c in configs if needs_drm(c)]
    if scored_by_drm and not os.path.isfile(args.drm):
        raise UserError(f"--drm {args.drm!r}: no such file, and {', '.join(scored_by_drm)} train on the DRM (the "
                        f"shipped one is toy/assets/drm.safetensors; or --configs grpo_oracle)")
    if args.eval_every < 1:
        raise UserError(f"--eval-every {args.eval_every}: must be >= 1 (the curves are made of the evaluations)")
    if args.group < 2:
        raise UserError(f"--group {args.group}: grpo needs >= 2 trajectories per prompt to compare")
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        raise UserError(f"--extra {args.extra!r}: {e}") from None
    for flag in extra:
        if flag.split("=")[0] in SET_PER_RUN:
            raise UserError(f"--extra sets {flag}, which this driver sets per run ({', '.join(SET_PER_RUN)})")
    return configs, seeds, extra, baseline


def run_flags(name, seed, run_dir, args, extra):
    """step_grpo.py's flags of one run: the configuration's, the common ones, then --extra (later flags win)."""
    flags = [*CONFIGS[name], "--seed", str(seed), "--max-minutes", str(args.minutes), "--eval-every",
             str(args.eval_every), "--eval-batch-size", "64",  # the toy model: one batch per evaluation
             "--cfg-in-loss", "--resume", "latest", "--out", run_dir]
    if "grpo" in CONFIGS[name]:
        flags += ["--group", str(args.group)]
    if needs_drm(name):
        flags += ["--drm", os.path.abspath(args.drm)]
    return flags + extra


def done_flags(run_dir):
    """The flags a finished run was made with, or None if it is not finished."""
    path = os.path.join(run_dir, "done.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["flags"]


def run_one(label, run_dir, flags):
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "log.txt")
    with open(log_path, "a") as log:  # appended: a resumed run keeps the log of its earlier part
        child = subprocess.Popen([sys.executable, os.path.join(ROOT, "step_grpo.py"), *flags], cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT)
        default = signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # preemption: it checkpoints, exits
        code = child.wait()
        signal.signal(signal.SIGTERM, default)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    if code != 0 or not rows or "eval_prompts" not in rows[-1]:  # e.g. SIGTERM: it checkpoints and exits 0
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise SystemExit(f"error: {label} stopped without a final evaluation (exit {code}; run this command again "
                         f"to resume it). The end of {log_path}:\n{tail}")
    with open(os.path.join(run_dir, "done.json.tmp"), "w") as f:
        json.dump(dict(flags=flags, final=rows[-1]), f)
    os.replace(os.path.join(run_dir, "done.json.tmp"), os.path.join(run_dir, "done.json"))
    return rows[-1]


# ----------------------------------------------------------------------------------------------------------------
# The summary: pure functions of the metrics rows

def evaluations(rows):
    """The evaluation rows of one run's metrics.jsonl, in step order. A resumed step_grpo.py drops the rows after
    its checkpoint and carries device_seconds on, so the file is one history."""
    return [r for r in rows if "eval_prompts" in r]


def mean_interval(values):
    """(mean, half-width of the 95% t-interval over the values); no interval (None) from one value. Past 10
    degrees of freedom the 10-dof quantile is used: slightly wide."""
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95[min(n - 1, 10)] * sd / math.sqrt(n)


def mean_curve(runs, y):
    """Seed-mean curve [{step, device_seconds, y}] of runs (one list of evaluation rows per seed): at every
    evaluation step up to the shortest run's last one, each run linearly interpolated there. [] if a run lacks y."""
    runs = [[r for r in rows if y in r] for rows in runs]
    if not runs or not all(runs):
        return []
    end = min(rows[-1]["step"] for rows in runs)
    steps = sorted({r["step"] for rows in runs for r in rows if r["step"] <= end})
    curve = [dict(step=s) for s in steps]
    for key in (y, "device_seconds"):
        values = np.mean([np.interp(steps, [r["step"] for r in rows], [r[key] for r in rows]) for rows in runs], 0)
        for row, value in zip(curve, values):
            row[key] = round(float(value), 6)
    return curve


def first_reaching(curve, y, target):
    """(step, device_seconds) of the curve's first point with y >= target, or None."""
    return next(((r["step"], r["device_seconds"]) for r in curve if r[y] >= target), None)


def reward_hacked(rows):
    """One run's evaluations: the DRM's score rose while the oracle's fell by more than HACKING_ORACLE_DROP.
    None when the run has no DRM scores."""
    rows = [r for r in rows if "eval_drm" in r and "eval_oracle" in r]
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    return last["eval_drm"] - first["eval_drm"] > 0 and last["eval_oracle"] - first["eval_oracle"] < \
        -HACKING_ORACLE_DROP


def summarize(runs, baseline_name="grpo"):
    """runs: {configuration: {seed: evaluation rows}} -> the summary (summary.json's layout)."""
    curves = {name: mean_curve(list(by_seed.values()), "eval_oracle") for name, by_seed in runs.items()}
    baseline = curves.get(baseline_name)
    target = baseline[-1]["eval_oracle"] if baseline else None
    base_hit = first_reaching(baseline, "eval_oracle", target) if baseline else None
    configs = {}
    for name, by_seed in runs.items():
        firsts, lasts = [rows[0] for rows in by_seed.values()], [rows[-1] for rows in by_seed.values()]
        entry = dict(seeds=list(by_seed), first_steps=[r["step"] for r in firsts],
                     final_steps=[r["step"] for r in lasts])
        for y in ("eval_oracle", "eval_drm"):
            if all(y in r for r in firsts + lasts):
                entry[f"first_{y}"] = mean_interval([r[y] for r in firsts])[0]
                entry[f"final_{y}"], entry[f"final_{y}_ci95"] = mean_interval([r[y] for r in lasts])
                entry[f"gain_{y}"], entry[f"gain_{y}_ci95"] = mean_interval([b[y] - a[y] for a, b in
                                                                              zip(firsts, lasts)])
        rival = runs.get(baseline_name, {})
        paired = [rows[-1]["eval_oracle"] - rival[seed][-1]["eval_oracle"] for seed, rows in by_seed.items()
                  if seed in rival and "eval_oracle" in rows[-1] and "eval_oracle" in rival[seed][-1]]
        if rival and len(paired) == len(by_seed):  # the same seeds: their shared base model cancels
            entry["final_eval_oracle_vs_baseline"], entry["final_eval_oracle_vs_baseline_ci95"] = \
                mean_interval(paired)
        hit = first_reaching(curves[name], "eval_oracle", target) if base_hit and curves[name] else None
        entry["steps_to_target"], entry["seconds_to_target"] = hit or (None, None)
        trained = hit and hit[0] > 0 and base_hit[0] > 0  # a target the base model already meets times nothing
        entry["speedup_steps"] = base_hit[0] / hit[0] if trained else None
        entry["speedup_seconds"] = base_hit[1] / hit[1] if trained and hit[1] > 0 else None
        entry["reward_hacking"] = {str(seed): reward_hacked(rows) for seed, rows in by_seed.items()}
        configs[name] = entry
    return dict(baseline=baseline_name, target_eval_oracle=target, target_step=base_hit[0] if base_hit else None,
                configs=configs, curves=curves)


def markdown_table(summary):
    def num(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    def with_ci(entry, key):
        if key not in entry:
            return "-"
        ci = entry[key + "_ci95"]
        return num(entry[key]) + ("" if ci is None else f" ± {ci:.3f}")

    lines = ["| configuration | seeds | first oracle | final oracle | oracle gain | final oracle minus "
             f"{summary['baseline']}'s, paired | first DRM | final DRM | final steps | steps to target | "
             "speed-up (steps) | speed-up (device-s) | reward hacking |", "|---" * 13 + "|"]
    for name, e in summary["configs"].items():
        hacked = [f for f in e["reward_hacking"].values() if f is not None]
        lines.append(f"| {name} | {len(e['seeds'])} | {num(e.get('first_eval_oracle'))} | "
                     f"{with_ci(e, 'final_eval_oracle')} | {with_ci(e, 'gain_eval_oracle')} | "
                     f"{with_ci(e, 'final_eval_oracle_vs_baseline')} | {num(e.get('first_eval_drm'))} | "
                     f"{with_ci(e, 'final_eval_drm')} | {', '.join(map(str, e['final_steps']))} | "
                     f"{'-' if e['steps_to_target'] is None else e['steps_to_target']} | "
                     f"{num(e['speedup_steps'], 2)} | {num(e['speedup_seconds'], 2)} | "
                     f"{f'{sum(hacked)}/{len(hacked)} runs' if hacked else '-'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------

def before_after(out, configs, seed, path):
    """One PNG: for each configuration, the first seed's evaluation samples at step 0 (the base model) above the
    same prompts and noise at its last evaluation (step_grpo.py's OUT/samples), labelled on the left."""
    from PIL import Image, ImageDraw
    rows = []
    for name in configs:
        folder = os.path.join(out, f"{name}_s{seed}", "samples")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for png in (names[0], names[-1]) if len(names) > 1 else ():  # step 0 and the last evaluation
            rows.append((f"{name}  step {int(png[5:11])}", Image.open(os.path.join(folder, png)).convert("RGB")))
    if not rows:
        return None
    label_w = 170
    sheet = Image.new("RGB", (label_w + max(im.width for _, im in rows), sum(im.height for _, im in rows)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for label, image in rows:
        sheet.paste(image, (label_w, y))
        draw.text((4, y + image.height // 2 - 6), label, fill="black")
        y += image.height
    sheet.save(path)
    return sheet


def main(argv=None):
    args = parse_args(argv)
    configs, seeds, extra, baseline = check_args(args)
    out = os.path.abspath(args.out)
    plan = [(name, seed, os.path.join(out, f"{name}_s{seed}")) for seed in seeds for name in configs]
    flags = {run_dir: run_flags(name, seed, run_dir, args, extra) for name, seed, run_dir in plan}
    for run_dir, run in flags.items():  # a finished run made with other flags would mix two experiments
        if done_flags(run_dir) not in (None, run):
            raise UserError(f"--out {args.out}: {run_dir} was run with other flags (its done.json): use another "
                            f"--out, or delete that folder")

    # 1. Run every configuration x seed, seed by seed (a partial comparison is complete in configurations).
    for i, (name, seed, run_dir) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {name} seed {seed}"
        if done_flags(run_dir) is not None:
            print(f"{label}: done already, skipped", flush=True)
            continue
        print(f"{label}: {args.minutes} min of step_grpo.py (log: {run_dir}/log.txt)", flush=True)
        final = run_one(label, run_dir, flags[run_dir])
        print(f"{label}: final step {final['step']}: "
              f"{ {k: v for k, v in final.items() if k.startswith('eval_') and k != 'eval_prompts'} }", flush=True)

    # 2. Summarise: table, summary.json, seed-mean curves.
    runs = {name: {seed: evaluations(read_metrics(os.path.join(out, f"{name}_s{seed}", "metrics.jsonl")))
                   for seed in seeds} for name in configs}
    summary = summarize(runs, baseline)
    summary.update(minutes=args.minutes, eval_every=args.eval_every, group=args.group, extra=extra)
    with open(os.path.join(out, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    print(markdown_table(summary))
    if summary["target_eval_oracle"] is not None:
        print(f"target: {baseline}'s seed-mean eval_oracle {summary['target_eval_oracle']:.3f}, reached at step "
              f"{summary['target_step']}; speed-up = {baseline}'s steps (device-seconds) to it / the configuration's")
    for y, png in (("eval_oracle", "oracle.png"), ("eval_drm", "drm.png")):
        curves = [(name, mean_curve(list(runs[name].values()), y)) for name in configs]
        plot_runs([(name, curve) for name, curve in curves if curve], y, os.path.join(out, png))
    grid = before_after(out, configs, seeds[0], os.path.join(out, "before_after.png"))
    print(f"wrote {out}/summary.json, oracle.png, drm.png" + (", before_after.png" if grid else ""))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
