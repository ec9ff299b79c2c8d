"""Line plots of training curves as PNG, drawn with PIL (no plotting library needed).

    python plot.py runs/step/metrics.jsonl runs/grpo/metrics.jsonl --y eval_oracle --out runs/compare.png

Each metrics.jsonl (one JSON object a line, as step_grpo.py writes) becomes one line per panel: the --y field
against "step" (left panel) and against "device_seconds" (right panel), using only the rows that have --y.
"""
import argparse
import json
import os

from PIL import Image, ImageDraw

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows, x, y):
    """(xs, ys) of the rows that have both fields, in file order."""
    points = [(r[x], r[y]) for r in rows if x in r and y in r and r[y] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def nice_range(values):
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def draw_panel(draw, box, lines, x_label, y_label):
    """Axes with min/max ticks and one polyline per (label, xs, ys, colour) inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    xs_all = [x for _, xs, _, _ in lines for x in xs]
    ys_all = [y for _, _, ys, _ in lines for y in ys]
    if not xs_all:
        draw.text((left + 10, top + 10), f"no '{y_label}' values", fill="black")
        return
    (x0, x1), (y0, y1) = nice_range(xs_all), nice_range(ys_all)

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for label, xs, ys, colour in lines:
        points = [to_px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    draw.text((left, bottom + 4), f"{x0:.4g}", fill="black")
    draw.text((right - 40, bottom + 4), f"{x1:.4g}", fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 4), x_label, fill="black")
    draw.text((left - 48, top), f"{y1:.4g}", fill="black")
    draw.text((left - 48, bottom - 10), f"{y0:.4g}", fill="black")
    draw.text((left + 4, top + 4), y_label, fill="black")


def plot_runs(runs, y, path, x_fields=("step", "device_seconds")):
    """runs: [(label, rows)]. One panel per x field, one line per run; written to path as PNG."""
    panel_w, panel_h, margin = 420, 300, 60
    width = len(x_fields) * (panel_w + margin) + margin
    height = panel_h + 2 * margin + 18 * len(runs)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for p, x in enumerate(x_fields):
        left = margin + p * (panel_w + margin)
        lines = [(label, *series(rows, x, y), COLOURS[i % len(COLOURS)]) for i, (label, rows) in enumerate(runs)]
        draw_panel(draw, (left, margin // 2, left + panel_w, margin // 2 + panel_h), lines, x, y)
    for i, (label, _) in enumerate(runs):  # legend
        yy = panel_h + margin + 18 * i
        draw.rectangle((margin, yy + 4, margin + 12, yy + 12), fill=COLOURS[i % len(COLOURS)])
        draw.text((margin + 18, yy), label, fill="black")
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)
    return image


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files, one line each in the plot")
    p.add_argument("--y", default="eval_oracle", help="field to plot (e.g. eval_oracle, eval_drm, reward)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    runs = []
    for path in args.metrics:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: no such metrics file")
        runs.append((os.path.basename(os.path.dirname(os.path.abspath(path))), read_metrics(path)))
    plot_runs(runs, args.y, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
