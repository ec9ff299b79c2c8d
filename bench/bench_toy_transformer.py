"""Milliseconds per training step of the toy transformer (toy/build.py's stage 3), side by side in one process.

The step is the build's: logit-normal t, its flow_matching_loss (bf16 autocast), grad clip 1.0, AdamW. Variants
change only how the step runs:

    sync       torch.compile (default mode), AdamW (foreach), loss.item() every step (a host sync per step)
    fused      AdamW(fused=True), the loss kept on the GPU (toy/build.py with --no-cuda-graph)
    autotune   fused + torch.compile(mode="max-autotune-no-cudagraphs")
    graphs     fused + torch.compile(mode="reduce-overhead"): forward and backward replayed as CUDA graphs
    graphs_flat  graphs without cudagraph trees (torch._inductor.config.triton.cudagraph_trees = False)
    step_graph   fused, the whole step (forward, backward, clip, AdamW) captured as one CUDA graph by hand
                 (toy.build.make_train_step), torch.compile of the whole model
    step_graph_blocks  step_graph with each transformer block compiled instead (model.compile_blocks): one block
                 graph compiles and the others reuse it, so the first compilation is shorter
    eager      sync without torch.compile

Random weights and latents of the toy's shapes (16 x 16 x 16 latents, patch 1, 93 context tokens): the speed does
not depend on what was learned. Every variant starts from the same weights and draws the same batches, so its mean
loss over the last window should match the others' up to rounding: a variant that trains differently shows there
(graphs did, in a real build: docs/toy/README.md round 11). Prints a table (median and quartiles over timed
windows) and writes JSON. The warm-up column holds the compilation: to time a first compilation, run each variant
in its own process with empty caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR set to new folders).

    python bench/bench_toy_transformer.py --batches 256,512 --variants sync,fused,eager --out bench/results/x.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import SD3Transformer2DModel  # noqa: E402

from model import compile_blocks  # noqa: E402
from toy.build import make_train_step, transformer_config, transformer_optimizer  # noqa: E402

CONTEXT = 77 + 16  # CLIP tokens + T5 tokens (MAX_SEQUENCE_LENGTH) of the toy pipeline
VARIANTS = ("sync", "fused", "autotune", "graphs", "graphs_flat", "step_graph", "step_graph_blocks", "eager")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="256,512", help="batch sizes, comma-separated")
    p.add_argument("--variants", default="sync,fused,eager", help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--windows", type=int, default=5, help="timed windows per variant")
    p.add_argument("--window-steps", type=int, default=40, help="steps per timed window")
    p.add_argument("--out", default="bench/results/toy_transformer.json", help="JSON output")
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r} (known: {', '.join(VARIANTS)})")
    return args


def make_step(variant, batch, device, window):
    """A closure running one training step of a fresh toy transformer, and one reading the mean loss of the last
    `window` steps."""
    torch.manual_seed(0)  # the same weights and batches for every variant
    if device.type == "cuda":  # read when the first step compiles
        import torch._inductor.config as inductor_config
        inductor_config.triton.cudagraph_trees = variant != "graphs_flat"
    model = SD3Transformer2DModel(**transformer_config(patch_size=1)).train().to(device)
    params = list(model.parameters())
    graphed = variant.startswith("step_graph") and device.type == "cuda"
    if variant in ("sync", "eager"):
        optimizer = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.01)
    else:
        optimizer = transformer_optimizer(params, 4e-4, device, graphed)
    mode = {"autotune": "max-autotune-no-cudagraphs", "graphs": "reduce-overhead",
            "graphs_flat": "reduce-overhead"}.get(variant, "default")
    if variant == "eager" or device.type != "cuda":
        forward = model
    elif variant == "step_graph_blocks":
        forward = compile_blocks(model)
    else:
        forward = torch.compile(model, mode=mode)
    train_step = make_train_step(forward, params, optimizer, graphed)
    latents = torch.randn(4096, 16, 16, 16, device=device)
    embeds = torch.randn(64, CONTEXT, 128, device=device)
    pooled = torch.randn(64, 96, device=device)
    state = dict(losses=[], value=float("nan"))

    def step():
        idx = torch.randint(len(latents), (batch,), device=device)
        cond = torch.randint(len(embeds), (batch,), device=device)
        x0 = latents[idx]
        t = torch.sigmoid(torch.randn(batch, device=device))
        loss = train_step((x0, torch.randn_like(x0), t, embeds[cond], pooled[cond]))
        if variant in ("sync", "eager"):
            state["value"] = loss.item()  # a host sync per step
        state["losses"] = (state["losses"] + [loss.detach()])[-window:]

    def last_window_loss():
        return float(torch.stack(state["losses"]).mean())

    return step, last_window_loss


def time_variant(variant, batch, args, device):
    step, last_window_loss = make_step(variant, batch, device, args.window_steps)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    warmup_s = time.perf_counter() - t0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs  # > 1 per variant: graph breaks
    ms = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.window_steps):
            step()
        torch.cuda.synchronize() if device.type == "cuda" else None
        ms.append(1000 * (time.perf_counter() - t0) / args.window_steps)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return dict(variant=variant, batch=batch, ms_median=statistics.median(ms), ms_q1=q[0], ms_q3=q[2],
                ms_windows=ms, warmup_s=warmup_s, compiled_graphs=graphs, loss_last_window=last_window_loss(),
                steps=args.warmup + args.windows * args.window_steps, steps_per_s=1000 / statistics.median(ms),
                images_per_s=batch * 1000 / statistics.median(ms))


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    print(f"{'variant':<17} {'batch':>5} {'ms/step median':>15} {'q1-q3':>13} {'steps/s':>8} {'images/s':>9} "
          f"{'warm-up s':>9} {'graphs':>6} {'last loss':>9}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        for variant in args.variants.split(","):
            r = time_variant(variant, batch, args, device)
            rows.append(r)
            print(f"{variant:<17} {batch:>5} {r['ms_median']:>15.1f} {r['ms_q1']:>6.1f}-{r['ms_q3']:<6.1f} "
                  f"{r['steps_per_s']:>8.1f} {r['images_per_s']:>9.0f} {r['warmup_s']:>9.1f} {r['compiled_graphs']:>6} "
                  f"{r['loss_last_window']:>9.4f}", flush=True)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:  # after each row: a run stopped early keeps what it measured
                json.dump(dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(parse_args())
