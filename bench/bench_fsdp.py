"""Per-GPU memory and pairs/s of reward_train.py's full-backbone step under DDP and under FSDP2 (--fsdp), at SD3.5's
real shapes; and (--paper) the per-GPU memory table worked out from parameter counts, no GPU needed.

One step is bench_reward_train.py's: one sigma per pair, winner and loser noised independently and scored in one
(2B, ...) forward of model.DRM (full backbone, m = 3 Medium, 5 Large), Bradley-Terry loss, backward, clip 1.0,
AdamW (lr 1e-5, wd 1e-4), bf16 autocast on a GPU. It is wrapped as reward_train.py wraps it, through the
trainer's own functions (imported, so this measures the trainer's sharding, not a copy): DDP over fp32 trained and
bf16 frozen weights, or reward_train.shard_drm (every weight fp32, a unit per block and the head, bf16 gathers).
Random weights of the real shape (tiny_pipeline.SD35_MEDIUM / SD35_LARGE, built on the GPU) and random latents
(16 x 64 x 64: 512 px) and embeddings (77 + 512 tokens); the VAE and text encoders are not run: the trainer also
holds them, ~10.6 GiB in bf16 on every GPU (--paper counts them). Peak memory is torch.cuda.max_memory_allocated
over the timed steps, the largest over ranks; pairs/s counts all ranks. A configuration that runs out of memory
is reported as such. Each mode runs under torchrun in its own processes (FSDP needs a process group, even of one).

    python bench/bench_fsdp.py --paper                                       # the table, CPU, a few seconds
    python bench/bench_fsdp.py --gpus 1 --shape medium --batch 2,8           # one GPU: FSDP over 1 rank shards
                                                                             # nothing (its overhead only)
    python bench/bench_fsdp.py --gpus 8 --shape large --checkpointing        # the 7BConvGN recipe's memory
    python bench/bench_fsdp.py --tiny --gpus 2                               # CPU smoke check (gloo, fp32)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model  # noqa: E402
import reward_train  # noqa: E402
import tiny_pipeline  # noqa: E402

SHAPES = {"medium": (tiny_pipeline.SD35_MEDIUM, 3), "large": (tiny_pipeline.SD35_LARGE, 5),
          "tiny": (tiny_pipeline.TINY_TRANSFORMER, 1)}
GIB = 2 ** 30


# ----------------------------------------------------------------------------------------------------------------
# --paper: the memory of one GPU, from parameter counts

def count(module):
    return sum(p.numel() for p in module.parameters())


def text_encoder_params():
    """SD3's three text encoders, counted on the meta device from their published configs (CLIP-L, OpenCLIP
    bigG, T5-XXL encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                            num_hidden_layers=12, num_attention_heads=12,
                                                            projection_dim=768))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
    return count(clip_l) + count(clip_g) + count(t5)


def block_activation_bytes(block, rows, image_tokens, text_tokens, width):
    """Bytes autograd keeps for one block's backward at these shapes (bf16), counted on the meta device. The L x L
    attention matrix that eager attention keeps is left out: flash attention, what a GPU runs, keeps none."""
    params = {id(p) for p in block.parameters()}
    kept = {}

    def pack(x):
        base = x if x._base is None else x._base
        square = x.dim() >= 3 and x.shape[-1] == x.shape[-2] and x.shape[-1] > 64  # the attention matrix
        if id(base) not in params and id(x) not in params and not square:
            kept[id(base)] = base.numel() * base.element_size()
        return x

    def new(*shape):
        return torch.randn(*shape, device="meta", dtype=torch.bfloat16, requires_grad=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        block(hidden_states=new(rows, image_tokens, width), encoder_hidden_states=new(rows, text_tokens, width),
              temb=new(rows, width))
    return sum(kept.values())


def paper_table(world, pairs, t5_tokens, latent_size, vae_params=83.7e6):
    """Rows (what, formula, Medium FSDP, Large FSDP, Medium DDP, Large DDP) in GiB per GPU."""
    columns, encoders = {}, text_encoder_params() + vae_params
    for name in ("medium", "large"):
        config, m = SHAPES[name]
        with torch.device("meta"):
            transformer = tiny_pipeline.SD3Transformer2DModel(**config).to(torch.bfloat16)
            drm = model.DRM(transformer, m, "full")
        total, trained = count(drm), sum(p.numel() for p in drm.parameters() if p.requires_grad)
        frozen = total - trained
        blocks = [count(b) for b in transformer.transformer_blocks[:drm.prefix_blocks]]
        width = config["num_attention_heads"] * config["attention_head_dim"]
        rows, image_tokens, text_tokens = 2 * pairs, (latent_size // config["patch_size"]) ** 2, 77 + t5_tokens
        kept_inputs = drm.prefix_blocks * rows * (image_tokens + text_tokens + 1) * width * 2  # checkpointed: inputs
        one_block = max(block_activation_bytes(b, rows, image_tokens, text_tokens, width)
                        for b in transformer.transformer_blocks[:2])  # Medium's first is dual-attention
        pos_embed = sum(b.numel() * 4 for b in drm.buffers())  # fp32, replicated
        big = max(blocks)
        columns[name] = dict(
            fsdp=[4 * total / world, 4 * trained / world, 8 * trained / world,
                  2 * 2 * big + 2 * big + 4 * big,  # this block and the prefetched one (bf16), its grads bf16 + fp32
                  kept_inputs + one_block, pos_embed, 2 * encoders],
            ddp=[4 * trained + 2 * frozen, 4 * trained + 4 * trained,  # DDP's buckets: a second copy of the grads
                 8 * trained, 0, kept_inputs + one_block, pos_embed, 2 * encoders],
            load=4 * (total + encoders) + pos_embed,  # load_pipeline's fp32 copy on the GPU, before casting/sharding
            total=total, trained=trained, big=big, one_block=one_block)
    what = [("weights", f"fp32 / {world} (DDP: trained fp32, frozen bf16)"),
            ("gradients", f"fp32 / {world} (DDP: fp32 + its bucket copy)"),
            ("AdamW m, v", f"2 x fp32 / {world}"),
            ("gathered block", "2 blocks bf16 + 1 block's grads bf16 and fp32 (FSDP only)"),
            ("activations", f"{pairs} pairs = {2 * pairs} rows, checkpointed: block inputs + one block's backward"),
            ("pos_embed buffer", "fp32, on every GPU"),
            ("VAE + text encoders", "bf16, on every GPU")]
    table = [(w, f, *(columns[s][k][i] / GIB for k in ("fsdp", "ddp") for s in ("medium", "large")))
             for i, (w, f) in enumerate(what)]
    table.append(("total", "", *(sum(columns[s][k]) / GIB for k in ("fsdp", "ddp") for s in ("medium", "large"))))
    return table, columns


def print_paper(args):
    table, columns = paper_table(args.world, args.pairs, args.t5_tokens, args.latent_size)
    m, l_ = columns["medium"], columns["large"]
    print(f"# per GPU, {args.world} GPUs, {args.pairs} pairs per GPU, {77 + args.t5_tokens} text tokens, "
          f"latents {args.latent_size}^2. Medium {m['total'] / 1e9:.3f}B parameters ({m['trained'] / 1e9:.3f}B "
          f"trained, largest block {m['big'] / 1e6:.1f}M), Large {l_['total'] / 1e9:.3f}B ({l_['trained'] / 1e9:.3f}B,"
          f" {l_['big'] / 1e6:.1f}M). One block's backward activations: {m['one_block'] / GIB:.2f} / "
          f"{l_['one_block'] / GIB:.2f} GiB. Loading (fp32 pipeline on the GPU, before the cast and the sharding): "
          f"{m['load'] / GIB:.1f} / {l_['load'] / GIB:.1f} GiB.")
    print("| what | how | Medium FSDP | Large FSDP | Medium DDP | Large DDP |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, how, *gib in table:
        print(f"| {what} | {how} | " + " | ".join(f"{g:.1f}" for g in gib) + " |")


# ----------------------------------------------------------------------------------------------------------------
# Measuring: one torchrun job per mode

def worker(args):
    rank, world, device = reward_train.setup_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # reward_train's --precision auto
    config, m = SHAPES[args.shape]
    torch.manual_seed(0)
    result = dict(mode=args.worker, gpus=world, shape=args.shape, pairs=args.pairs, checkpointing=args.checkpointing)
    try:
        with device:
            drm = model.DRM(tiny_pipeline.SD3Transformer2DModel(**config), m, "full")
        fsdp = args.worker == "fsdp"
        for p in drm.parameters():  # as reward_train.main
            p.data = p.data.float() if p.requires_grad or fsdp else p.data.to(dtype)
        drm.gradient_checkpointing = args.checkpointing
        drm.train()
        if fsdp:
            reward_train.shard_drm(drm, device, dtype, world)
        trainable = [p for p in drm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-4)
        net = torch.nn.parallel.DistributedDataParallel(drm, device_ids=[device.index] if device.type == "cuda"
                                                        else None) if world > 1 and not fsdp else drm
        result |= time_steps(net, trainable, optimizer, config, device, dtype, args)
    except torch.cuda.OutOfMemoryError as e:
        result["error"] = f"out of memory: {str(e).splitlines()[0]}"
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)


def time_steps(net, trainable, optimizer, config, device, dtype, args):
    n, latent, text = args.pairs, args.latent_size, 77 + args.t5_tokens
    x0 = torch.randn(2 * n, config["in_channels"], latent, latent, device=device)  # (2n, C, h, w): winners, losers
    embeds = torch.randn(n, text, config["joint_attention_dim"], device=device, dtype=dtype).repeat(2, 1, 1)
    pooled = torch.randn(n, config["pooled_projection_dim"], device=device, dtype=dtype).repeat(2, 1)
    generator = torch.Generator(device).manual_seed(0)

    def step():
        sigma = reward_train.sample_sigmas(n, "logit_normal", generator).repeat(2)  # (2n,)
        x = reward_train.add_noise(x0, torch.randn(x0.shape, generator=generator, device=device), sigma)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            scores = net(x, 1000 * sigma, embeds, pooled)  # (2n,)
        reward_train.bt_loss(scores[:n], scores[n:]).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()  # each step ends on the host: the collectives already sync the ranks
        times.append(time.perf_counter() - t0)
    peak = torch.tensor(float(torch.cuda.max_memory_allocated()) if cuda else 0.0, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        world = torch.distributed.get_world_size()
    else:
        world = 1
    median = statistics.median(times)
    return dict(median_s=median, min_s=min(times), max_s=max(times), pairs_per_s=world * n / median,
                peak_gib=float(peak) / GIB if cuda else None)


def launch(mode, pairs, args):
    """One torchrun job of one mode at one batch; its result dict (or the error it died with)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                   os.path.abspath(__file__), "--worker", mode, "--result", path, "--shape", args.shape,
                   "--pairs", str(pairs), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--t5-tokens", str(args.t5_tokens), "--latent-size", str(args.latent_size)]
        command += ["--checkpointing"] if args.checkpointing else []
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        done = subprocess.run(command, cwd=ROOT, env=env, timeout=args.timeout, capture_output=True, text=True)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return dict(mode=mode, gpus=args.gpus, shape=args.shape, pairs=pairs, checkpointing=args.checkpointing,
                    error=f"exit {done.returncode}: " + (done.stderr.strip().splitlines() or [""])[-1][:300])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", action="store_true", help="print the memory table from parameter counts and exit")
    p.add_argument("--world", type=int, default=8, help="--paper: GPUs the model is sharded over")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: the tiny transformer, 16x16 latents")
    p.add_argument("--shape", default="medium", choices=sorted(SHAPES), help="transformer shape")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per torchrun job")
    p.add_argument("--modes", default="ddp,fsdp", help="comma list of ddp, fsdp")
    p.add_argument("--batch", default="2,8", help="comma list of pairs per GPU")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (reward_train's flag)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--t5-tokens", type=int, default=512, help="T5 length (text = 77 + this)")
    p.add_argument("--latent-size", type=int, default=64, help="latent height = width (64 = 512 px)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per torchrun job")
    p.add_argument("--out", default="", help="JSON results (default bench/results/fsdp.json; --tiny: runs/)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=2, help="--paper (and internally): pairs per GPU")
    args = p.parse_args()
    if args.paper:
        return print_paper(args)
    if args.worker:
        return worker(args)
    if args.tiny:
        args.shape, args.latent_size, args.t5_tokens, args.batch = "tiny", 16, 8, "2"
    args.out = args.out or ("runs/bench_fsdp_tiny.json" if args.tiny else "bench/results/fsdp.json")
    results = [launch(mode, int(b), args) for b in args.batch.split(",") for mode in args.modes.split(",")]
    for r in results:
        measured = r.get("error") or (f"{r['pairs_per_s']:.2f} pairs/s, median {r['median_s'] * 1e3:.0f} ms, "
                                      + (f"peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "no GPU"))
        print(f"{r['mode']:>4} x{r['gpus']} {r['shape']} {r['pairs']} pairs{' ckpt' if r['checkpointing'] else ''}: "
              f"{measured}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
