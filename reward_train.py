"""Bradley-Terry training of the DRM on preference pairs (PAPER.md section 1).

For each pair (winner, loser, prompt) draw ONE noise level sigma, noise the two VAE-mean latents with independent
noise to that sigma, score both with the DRM at timestep 1000 * sigma and minimise -log sigmoid(s_win - s_lose).
The default sigma is the authors' SD3.5-Medium recipe: u ~ logit-normal(0, 1) picks a point of the scheduler's
shift-3 training grid, so sigma's 10/50/90% quantiles are 0.46 / 0.75 / 0.92 (high noise is likely); their
SD3.5-Large recipe is a uniform point of the unshifted grid (--timestep-sampling grid_uniform --timestep-shift 1).
Held-out pairs are scored clean (t = 0, winner strictly above loser, the authors' rule) and at each noise level of
--eval-sigmas, to show how accuracy falls with noise.

Departures from the authors' code: the backbone is frozen by default (the design's default; --backbone full is
their recipe); clean latents use the VAE mean, not a sample; u counts from the low-noise end of the grid, so a
positive --logit-mean means more noise in both logit-normal modes (their index runs from the high-noise end: at
their mean 0 the two draw the same distribution); a bad record is an error (or, with --skip-bad, skipped and
counted), never replaced.

    python reward_train.py                                   # demo: tiny pipeline + generated pairs, CPU ok
    python reward_train.py --model /models/sd3.5-medium --train-data hpdv3/train.json:hpdv3/images \\
        --test-data hpdv3/test.json:hpdv3/images --out runs/drm
    torchrun --nproc_per_node=8 reward_train.py --model /models/sd3.5-medium --backbone full \\
        --train-data hpdv3/train.json:hpdv3/images --test-data hpdv3/test.json:hpdv3/images --out runs/drm
    torchrun --nproc_per_node=8 reward_train.py --model /models/sd3.5-large --skip-last-blocks 5 --backbone full \\
        --fsdp --gradient-checkpointing --timestep-sampling grid_uniform --timestep-shift 1 \\
        --train-data hpdv3/train.json:hpdv3/images --test-data hpdv3/test.json:hpdv3/images --out runs/drm-large

--fsdp (full backbone under torchrun) shards weights, gradients and AdamW state over the ranks with PyTorch's FSDP2
where plain DDP keeps all of them on every GPU: SD3.5-Large's ~120 GB of fp32 training state fits no single GPU.
The authors used DeepSpeed ZeRO-2 (weights whole on every GPU); FSDP2 also shards the weights (ZeRO-3), gathering
one block at a time. Its checkpoint is sharded: OUT/checkpoint.pt names a folder of per-rank shards.
"""
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import UserError, load_preference_data, make_demo_pairs
from model import DRM, encode_images, encode_prompts_cached, load_pipeline, save_drm

TIMESTEP_SAMPLINGS = ("grid_logit_normal", "grid_uniform", "logit_normal", "uniform")


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "SD3/SD3.5 diffusers folder; empty: the demo (a tiny random "
                                                     "pipeline and generated pairs under --out)"})
    train_data: list = field(default_factory=list, metadata={"help": "pairs file (HPDv3 .json or .jsonl), "
                                                                     "optionally ':IMAGE_DIR'; repeatable"})
    test_data: list = field(default_factory=list, metadata={"help": "held-out pairs, same format; repeatable"})
    min_confidence: float = field(default=0.95, metadata={"help": "drop pairs whose 'confidence' is lower"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) bad records instead of stopping"})
    resolution: int = field(default=0, metadata={"help": "square training size in px; 0: 512 (64 in the demo)"})
    max_sequence_length: int = field(default=512, metadata={"help": "T5 tokens (the authors trained with 512)"})
    skip_last_blocks: int = field(default=3, metadata={"help": "m: run the first N - m blocks (3 Medium, 5 Large)"})
    backbone: str = field(default="frozen", metadata={"help": "frozen | lora | full (the authors' recipe)"})
    train_output_layers: bool = field(default=True, metadata={"help": "frozen mode: train private copies of "
                                                                      "norm_out / proj_out too"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank (--backbone lora)"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (--backbone lora)"})
    timestep_sampling: str = field(default="grid_logit_normal", metadata={
        "choices": TIMESTEP_SAMPLINGS,
        "help": "how a pair's sigma is drawn. grid_logit_normal (the authors' SD3.5-Medium recipe): u = "
                "sigmoid(N(mean, std)) picks point floor(u N) of the scheduler's N-point grid, counted from low "
                "noise; grid_uniform: a uniform grid point (with --timestep-shift 1: the authors' SD3.5-Large "
                "recipe); logit_normal: sigma = sigmoid(N(mean, std)), continuous, unshifted; uniform: sigma ~ "
                "U[0, 1)"})
    timestep_shift: float = field(default=0.0, metadata={"help": "shift of the grid of the grid_* modes: sigma = "
                                                                 "shift s / (1 + (shift - 1) s); 0: the pipeline's "
                                                                 "scheduler config's (3.0 in SD3.5's folders)"})
    logit_mean: float = field(default=0.0, metadata={"help": "logit-normal mean (> 0: more noise)"})
    logit_std: float = field(default=1.0, metadata={"help": "logit-normal std"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    batch_size: int = field(default=2, metadata={"help": "pairs per GPU per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: --epochs)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop (evaluate, save) once training has run this "
                                                              "long (0: no limit), e.g. a job's time limit"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute prefix blocks in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the DRM"})
    fsdp: bool = field(default=False, metadata={"help": "--backbone full under torchrun: shard weights, gradients "
                                                        "and AdamW state over the ranks (FSDP2: a unit per block and "
                                                        "the head, bf16 compute over fp32 master weights), for a "
                                                        "model whose training state does not fit one GPU"})
    num_workers: int = field(default=2, metadata={"help": "image-loading worker processes per rank"})
    prompt_cache: int = field(default=0, metadata={"help": "keep the text embeddings of up to N distinct prompts on "
                                                           "the GPU (0: encode every batch); (77 + T5 tokens) x 4096 "
                                                           "x 2 bytes each: 4.8 MB at 512 tokens"})
    eval_every: int = field(default=500, metadata={"help": "evaluate every N steps (and at the end); 0: end only"})
    eval_sigmas: str = field(default="0,0.25,0.5,0.75,0.9", metadata={"help": "noise levels for held-out accuracy"})
    eval_batch_size: int = field(default=8, metadata={"help": "pairs per GPU when evaluating"})
    eval_pairs: int = field(default=0, metadata={"help": "evaluate on a fixed random subset of this many held-out "
                                                         "pairs (0: all); each evaluation re-encodes them"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps (and at the end)"})
    out: str = field(default="runs/drm", metadata={"help": "output folder: checkpoint.pt, drm.safetensors, "
                                                           "metrics.jsonl"})
    resume: str = field(default="", metadata={"help": "'latest' (OUT/checkpoint.pt, if any) or a checkpoint path"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    demo_pairs: int = field(default=384, metadata={"help": "demo only: generated training pairs"})


def parse_args(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        elif f.type is list:
            parser.add_argument(flag, action="append", default=[], help=f.metadata["help"])
        else:
            # Choices show in --help as argparse's {a,b} but are checked in check_args: one line, as every error.
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"],
                                metavar="{" + ",".join(choices) + "}" if choices else None)
    return Args(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------
# The math

def training_grid(scheduler_config, shift):
    """The scheduler's N training noise levels, high to low, as diffusers builds them from the pipeline's config:
    sigma = shift s / (1 + (shift - 1) s) for s = N/N ... 1/N (N = num_train_timesteps, 1000 in SD3.5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    # Dynamic (resolution-dependent) shifting only happens at inference time; training uses the static shift.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, shift=shift, use_dynamic_shifting=False)
    return scheduler.sigmas.float()  # (N,); set_timesteps was never called, so no terminal 0 is appended


def sample_sigmas(n, scheme, generator, mean=0.0, std=1.0, grid=None):
    """One noise level per pair, (n,). u is sigmoid(N(mean, std)) (logit-normal, SD3's training density) or U[0, 1);
    the continuous modes return u, the grid_* modes snap it to point floor(u N) of `grid` (training_grid), counted
    from the low-noise end. With mean 0 and the shift-3 grid that is the authors' Medium recipe: sigma's 10/50/90%
    quantiles are 0.46 / 0.75 / 0.92, where sigmoid(N(0, 1)) itself gives 0.22 / 0.50 / 0.78."""
    if scheme.endswith("logit_normal"):
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=generator.device))
    else:
        u = torch.rand(n, generator=generator, device=generator.device)
    if not scheme.startswith("grid_"):
        return u
    ascending = grid.flip(0).to(u.device)  # low noise first: a larger u is more noise, as in the continuous modes
    index = (u * len(ascending)).long().clamp(max=len(ascending) - 1)  # sigmoid rounds to 1.0 for a large draw
    return ascending[index]


def add_noise(x0, noise, sigma):
    """x_sigma = (1 - sigma) x0 + sigma eps, sigma (B,)."""
    sigma = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * noise


def bt_loss(score_win, score_lose):
    """Bradley-Terry negative log-likelihood that the winner beats the loser."""
    return -F.logsigmoid(score_win - score_lose).mean()


def batch_indices(step, micro, rank, world, batch_size, grad_accum, num_pairs, seed):
    """Pair indices of one micro-batch: a fresh permutation each epoch, rank-strided. The data position is the
    step itself, so resuming needs no sampler state."""
    start = ((step * grad_accum + micro) * world + rank) * batch_size
    indices, position = [], start
    while position < start + batch_size:  # one permutation per epoch the batch touches (two at a boundary)
        epoch, offset = divmod(position, num_pairs)
        take = min(start + batch_size - position, num_pairs - offset)
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices += order[offset:offset + take].tolist()
        position += take
    return indices


class StepBatches(torch.utils.data.Sampler):
    def __init__(self, first_step, last_step, **kw):
        self.first_step, self.last_step, self.kw = first_step, last_step, kw

    def __iter__(self):
        for step in range(self.first_step, self.last_step):
            for micro in range(self.kw["grad_accum"]):
                yield batch_indices(step, micro, **self.kw)

    def __len__(self):
        return (self.last_step - self.first_step) * self.kw["grad_accum"]


def collate(items):
    return dict(prompt=[i["prompt"] for i in items], winner=torch.stack([i["winner"] for i in items]),
                loser=torch.stack([i["loser"] for i in items]))


# ----------------------------------------------------------------------------------------------------------------
# Distributed, checkpoints, evaluation

def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def rank0_says(value, world, device):
    """Rank 0's yes/no on every rank (a decision from rank 0's clock must be the same everywhere)."""
    if world > 1:
        flag = torch.tensor(float(value), device=device)
        dist.broadcast(flag, 0)
        value = bool(flag > 0)
    return value


def any_rank_says(value, world, device):
    """Yes on every rank if any rank says yes (e.g. one rank got SIGTERM)."""
    if world > 1:
        flag = torch.tensor(float(value), device=device)
        dist.all_reduce(flag)
        value = bool(flag > 0)
    return value


def print0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)


def rng_state(generator):
    state = dict(torch=torch.get_rng_state(), noise=generator.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, weights, step, rng_states, args, elapsed=0.0):
    """One plain dict, written to a temp file and renamed, so a crash never leaves half a checkpoint. `weights`:
    the trained weights and optimizer state themselves, or (FSDP) the name of the folder that holds their shards."""
    checkpoint = dict(weights, step=step, rng=rng_states, args=asdict(args), elapsed=elapsed)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


# FSDP2 (--fsdp). What makes it more than a wrapper: ranks must start equal, a sharded forward is a collective
# (evaluation pads every rank to the same number of batches), and checkpoints are written by every rank.

def shard_drm(drm, device, dtype, world):
    """Shard the DRM in place (ZeRO-3): each transformer block and the head are a unit, gathered just before they
    run and freed after; the root unit holds the embedders and output layers. FSDP2 shards each parameter on its
    own, so a unit may mix trained and frozen ones (the last prefix block's context path): those get no gradient.
    The skipped blocks never run, so they are never gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # FSDP2 warns that in-place ops on a unit's output view would skip its hooks; the DRM's scores never get any.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for tensor in [*drm.parameters(), *drm.buffers()]:  # rank 0's head init everywhere, as DDP's constructor does
        dist.broadcast(tensor.data, 0)
    # bf16 gathers and compute over fp32 shards, gradients reduced in fp32. Inputs are left alone: in bf16 the
    # timestep 1000 * sigma would lose its fraction; autocast casts what the matmuls read, as under DDP.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if dtype != torch.float32 else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (world,))
    for unit in [*drm.transformer.transformer_blocks, drm.reward_output, drm]:
        # The root reshards too, so that between steps (and after a no-grad evaluation) every weight is a shard.
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return drm


def sharded_state(drm, optimizer):
    """The trained weights and the AdamW state, as this rank's shards keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    trained = {name for name, p in drm.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(drm).items() if k in trained}
    return dict(drm=weights, optimizer=get_optimizer_state_dict(drm, optimizer))


def save_sharded(out, step, drm, optimizer, rank):
    """Every rank writes its own shards (torch.distributed.checkpoint) into OUT/checkpoint-stepN: no rank gathers
    the whole state (~96 GB for SD3.5-Large). The folder counts only once checkpoint.pt names it, so a kill while
    it is written leaves the previous checkpoint in force. Returns the folder's name."""
    import torch.distributed.checkpoint as dcp
    name = f"checkpoint-step{step}"
    if rank == 0:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)  # half of one from a run killed while writing
    dist.barrier()
    dcp.save(sharded_state(drm, optimizer), checkpoint_id=os.path.join(out, name))
    return name


def remove_old_shards(out, keep):
    for name in os.listdir(out):
        if name.startswith("checkpoint-step") and name != keep:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def load_sharded(folder, drm, optimizer):
    """Shards back into place; a checkpoint written by another number of ranks is resharded on load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = sharded_state(drm, optimizer)  # the layout to fill (it creates AdamW's state, at zero, to fill)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(drm, state["drm"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(drm, optimizer, state["optimizer"])


def gathered_drm(drm, rank):
    """What save_drm reads of a DRM, with each trained parameter gathered whole (one at a time, on every rank: a
    collective) onto rank 0's CPU, so drm.safetensors is the same full file as without FSDP. None on other ranks."""
    from torch.distributed.tensor import DTensor
    tensors = {}
    for name, p in drm.named_parameters():
        if p.requires_grad:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            if rank == 0:
                tensors[name] = whole.detach().cpu()
    return SimpleNamespace(transformer=drm.transformer, config_dict=drm.config_dict,
                           trainable_state_dict=lambda: tensors) if rank == 0 else None


def truncate_metrics(path, step):
    """Keep the metrics.jsonl rows up to `step`: a run resumed from a checkpoint at `step` logs the rest again (-1:
    none, for a fresh run in a folder where an earlier one died before its first checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


@torch.no_grad()
def evaluate(drm, pipe, test_set, sigmas, args, rank, world, device, dtype, prompt_cache):
    """Held-out accuracy at each noise level: winner's score strictly above the loser's. The same noise draw on
    every call, so evaluations along training are comparable. Images load in --num-workers processes."""
    drm.eval()
    generator = torch.Generator(device).manual_seed(12345 + rank)
    correct, total = torch.zeros(len(sigmas), device=device), torch.zeros((), device=device)
    mine = list(range(rank, len(test_set), world))
    real, seen = len(mine), 0
    if args.fsdp:  # a sharded forward is a collective: every rank runs as many batches (the padding counts for none)
        mine += [0] * (math.ceil(len(test_set) / world) - real)
    for batch in torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, mine), batch_size=args.eval_batch_size,
                                             num_workers=args.num_workers, collate_fn=collate):
        n = len(batch["prompt"])
        counted = torch.arange(seen, seen + n, device=device) < real  # (n,)
        seen += n
        embeds, pooled = encode_prompts_cached(pipe, batch["prompt"], args.max_sequence_length, prompt_cache,
                                               args.prompt_cache)
        x0 = encode_images(pipe.vae, torch.cat([batch["winner"], batch["loser"]]).to(device)).float()  # (2n, C, h, w)
        for j, sigma in enumerate(sigmas):
            noise = torch.randn(x0.shape, generator=generator, device=device)
            x = add_noise(x0, noise, torch.full((2 * n,), sigma, device=device))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                scores = drm(x, torch.full((2 * n,), 1000 * sigma, device=device),
                             embeds.repeat(2, 1, 1), pooled.repeat(2, 1))
            correct[j] += ((scores[:n] > scores[n:]) & counted).sum()
        total += counted.sum()
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    drm.train()
    return {f"acc@{s:g}": round(float(c / total), 4) for s, c in zip(sigmas, correct)} | {"pairs": int(total)}


def prepare_demo(args, rank):
    """The embedded default: a tiny random SD3.5-style pipeline and generated clean-vs-degraded pairs."""
    from tiny_pipeline import save_tiny_pipeline
    root = os.path.join(args.out, "demo")
    if rank == 0 and not os.path.isfile(os.path.join(root, "test.json")):
        save_tiny_pipeline(os.path.join(root, "pipeline"), seed=args.seed)
        make_demo_pairs(root, args.demo_pairs, seed=args.seed, name="train.json")
        make_demo_pairs(root, 128, seed=args.seed + 1, name="test.json")
    if dist.is_initialized():
        dist.barrier()
    args.model = os.path.join(root, "pipeline")
    args.train_data, args.test_data = [os.path.join(root, "train.json")], [os.path.join(root, "test.json")]
    args.resolution = args.resolution or 64


def check_args(args):
    if args.backbone not in ("frozen", "lora", "full"):
        raise UserError(f"--backbone {args.backbone}: choose frozen, lora or full")
    if args.timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise UserError(f"--timestep-sampling {args.timestep_sampling}: choose {', '.join(TIMESTEP_SAMPLINGS)}")
    if args.timestep_shift < 0:
        raise UserError(f"--timestep-shift must be > 0 (or 0: the scheduler config's), got {args.timestep_shift}")
    if args.precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision {args.precision}: choose auto, bf16 or fp32")
    for name in ("batch_size", "grad_accum", "eval_batch_size", "lora_rank", "max_sequence_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("num_workers", "prompt_cache"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.model and not args.train_data:
        raise UserError("--train-data is required with --model (an HPDv3 .json or .jsonl of pairs)")
    if args.fsdp and args.backbone != "full":
        raise UserError(f"--fsdp shards trained weights, and --backbone {args.backbone} trains few (the backbone "
                        f"stays frozen, in bf16: 16 GB for SD3.5-Large): drop --fsdp, or use --backbone full")
    if args.fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp shards the model over torchrun's processes: launch with torchrun --nproc_per_node=N")
    if args.fsdp and args.compile:
        raise UserError("--fsdp with --compile is not supported (compiling the sharded DRM is untested): drop one")
    if args.resume and args.resume != "latest" and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint file")


# ----------------------------------------------------------------------------------------------------------------

def main(args):
    check_args(args)
    rank, world, device = setup_distributed()
    if not args.model:
        prepare_demo(args, rank)
    args.resolution = args.resolution or 512
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    torch.manual_seed(args.seed + rank)
    os.makedirs(args.out, exist_ok=True)

    train_set, skipped = load_preference_data(args.train_data, args.resolution, args.min_confidence, args.skip_bad)
    test_set, test_skipped = (load_preference_data(args.test_data, args.resolution, args.min_confidence,
                                                   args.skip_bad) if args.test_data else (None, 0))
    if test_set is not None and 0 < args.eval_pairs < len(test_set):
        keep = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(args.seed))[:args.eval_pairs]
        test_set.pairs = [test_set.pairs[i] for i in sorted(keep.tolist())]
    print0(f"pairs: {len(train_set)} train ({skipped} bad skipped), "
           f"{len(test_set) if test_set else 0} test ({test_skipped} bad skipped)", rank=rank)

    # Model: frozen VAE and text encoders; the DRM over the transformer (frozen parts in `dtype`, trained in fp32).
    pipe = load_pipeline(args.model, device=device)
    multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if args.resolution % multiple:
        raise UserError(f"--resolution {args.resolution} must be divisible by {multiple} for {args.model}")
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if part is not None:
            part.requires_grad_(False)
            if dtype != torch.float32:
                part.to(dtype)
    grid = None  # the grid_* modes snap sigma to the scheduler's training grid, shifted as its config says
    if args.timestep_sampling.startswith("grid_"):
        shift = args.timestep_shift or pipe.scheduler.config.get("shift", 1.0)
        grid = training_grid(pipe.scheduler.config, shift).to(device)
        print0(f"timesteps: {args.timestep_sampling} over the shift-{shift:g} grid of {len(grid)} noise levels",
               rank=rank)
    drm = DRM(pipe.transformer, args.skip_last_blocks, args.backbone, args.train_output_layers,
              args.lora_rank, args.lora_alpha).to(device)
    for p in drm.parameters():  # under FSDP the frozen stay fp32 too: one dtype per unit, and they are sharded
        p.data = p.data.float() if p.requires_grad or args.fsdp else p.data.to(dtype)
    drm.gradient_checkpointing = args.gradient_checkpointing
    drm.train()
    if args.fsdp:
        shard_drm(drm, device, dtype, world)  # its parameters are now this rank's shards: build the optimizer after
    trainable = [p for p in drm.parameters() if p.requires_grad]
    print0(f"DRM: {drm.prefix_blocks} prefix blocks, backbone {args.backbone}, "
           f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained parameters, {dtype}"
           f"{f', sharded over {world} ranks' if args.fsdp else ''}", rank=rank)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    model = torch.nn.parallel.DistributedDataParallel(drm, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if world > 1 and not args.fsdp else drm
    if args.compile:
        model = torch.compile(model)

    # Resume: weights, optimizer, step (= data position), every rank's RNG states.
    noise_generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    start_step, elapsed, checkpoint_path = 0, 0.0, os.path.join(args.out, "checkpoint.pt")
    resume_path = checkpoint_path if args.resume == "latest" else args.resume
    if resume_path and os.path.isfile(resume_path):
        checkpoint = torch.load(resume_path, map_location=device, weights_only=False)
        for name in ("backbone", "skip_last_blocks", "train_output_layers", "lora_rank"):
            if checkpoint["args"][name] != getattr(args, name):
                raise UserError(f"--resume {resume_path}: the checkpoint was trained with --{name.replace('_', '-')} "
                                f"{checkpoint['args'][name]}, this run has {getattr(args, name)}")
        if ("sharded" in checkpoint) != args.fsdp:
            written, change = ("without", "drop") if args.fsdp else ("with", "add")
            raise UserError(f"--resume {resume_path}: the checkpoint was written {written} --fsdp: {change} --fsdp")
        if args.fsdp:
            load_sharded(os.path.join(os.path.dirname(resume_path), checkpoint["sharded"]), drm, optimizer)
        else:
            drm.load_state_dict(checkpoint["drm"], strict=False)
            optimizer.load_state_dict(checkpoint["optimizer"])
        start_step, elapsed = checkpoint["step"], checkpoint.get("elapsed", 0.0)
        if len(checkpoint["rng"]) == world:
            set_rng_state(checkpoint["rng"][rank], noise_generator)
        else:
            print0(f"resume: {len(checkpoint['rng'])} ranks saved RNG states, {world} now: reseeding", rank=rank)
        print0(f"resumed from {resume_path} at step {start_step}", rank=rank)
    elif args.resume == "latest":
        print0(f"--resume latest: no {checkpoint_path} yet, starting fresh", rank=rank)

    pairs_per_step = args.batch_size * args.grad_accum * world
    total_steps = args.max_steps or max(1, math.floor(args.epochs * len(train_set) / pairs_per_step))
    loader = torch.utils.data.DataLoader(
        train_set, num_workers=args.num_workers, collate_fn=collate, generator=torch.Generator(),
        batch_sampler=StepBatches(start_step, total_steps, rank=rank, world=world, batch_size=args.batch_size,
                                  grad_accum=args.grad_accum, num_pairs=len(train_set), seed=args.seed))
    batches = iter(loader)
    sigmas_eval = [float(s) for s in args.eval_sigmas.split(",")]
    prompt_cache = {}  # prompt -> (embeds, pooled), up to --prompt-cache prompts
    stop = {"requested": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))  # preemption: checkpoint, exit
    if rank == 0:  # a resumed run logs again from its checkpoint on, a fresh one from the start: drop the rest
        truncate_metrics(os.path.join(args.out, "metrics.jsonl"), start_step if start_step else -1)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None

    def checkpoint_now(step):
        states = [rng_state(noise_generator)]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state(noise_generator))
        if args.fsdp:  # every rank writes its shards and takes part in gathering the exported weights
            folder = save_sharded(args.out, step, drm, optimizer, rank)
            weights, exported = dict(sharded=folder), gathered_drm(drm, rank)
        elif rank == 0:
            weights = dict(drm=drm.trainable_state_dict(), optimizer=optimizer.state_dict())
            exported = drm
        if rank == 0:
            save_checkpoint(checkpoint_path, weights, step, states, args, time.time() - t_start)
            save_drm(exported, os.path.join(args.out, "drm.safetensors"), args.model, args.max_sequence_length)
            if args.fsdp:
                remove_old_shards(args.out, keep=folder)

    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0)
    t_start = time.time() - elapsed  # --max-minutes counts the time before a resume too
    for step in bar:
        t0 = time.time()
        loss_sum, correct = 0.0, 0
        for micro in range(args.grad_accum):
            batch = next(batches)
            n = len(batch["prompt"])
            # 1. Encode: clean latents (VAE mean) for winners then losers, and the prompt embeddings.
            x0 = encode_images(pipe.vae, torch.cat([batch["winner"], batch["loser"]]).to(device)).float()  # (2n,C,h,w)
            embeds, pooled = encode_prompts_cached(pipe, batch["prompt"], args.max_sequence_length, prompt_cache,
                                                   args.prompt_cache)
            # 2. One sigma per pair, shared by winner and loser; independent noise for the two.
            sigma = sample_sigmas(n, args.timestep_sampling, noise_generator, args.logit_mean, args.logit_std, grid)
            sigma = torch.cat([sigma, sigma])  # (2n,)
            x = add_noise(x0, torch.randn(x0.shape, generator=noise_generator, device=device), sigma)
            # 3. Score both and take the Bradley-Terry loss.
            # DDP all-reduces grads on the last micro-batch; FSDP reduce-scatters every one into its sharded grads
            # (skipping it would hold whole unsharded grads: the memory FSDP is there to save).
            sync = micro == args.grad_accum - 1 or world == 1 or args.fsdp
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
                    (model.no_sync() if not sync else contextlib.nullcontext()):
                scores = model(x, 1000 * sigma, embeds.repeat(2, 1, 1), pooled.repeat(2, 1))  # (2n,)
                loss = bt_loss(scores[:n], scores[n:])
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
            correct += int((scores[:n] > scores[n:]).sum())
        # 4. Update.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)  # of sharded grads: over all ranks
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. Log, evaluate, checkpoint.
        done = step + 1
        out_of_time = rank0_says(args.max_minutes > 0 and time.time() - t_start > 60 * args.max_minutes, world,
                                 device)  # rank 0's clock decides, so that every rank stops at the same step
        last = done == total_steps or out_of_time
        row = dict(step=done, loss=round(loss_sum, 5), train_acc=round(correct / (n * args.grad_accum), 4),
                   grad_norm=round(float(grad_norm), 4), pairs_per_s=round(pairs_per_step / (time.time() - t0), 3))
        if test_set is not None and (last or (args.eval_every and done % args.eval_every == 0)):
            row["eval"] = evaluate(drm, pipe, test_set, sigmas_eval, args, rank, world, device, dtype,
                                   prompt_cache)
            print0(f"step {done} held-out accuracy: {row['eval']}", rank=rank)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=row["loss"], acc=row["train_acc"])
        stop["requested"] = any_rank_says(stop["requested"], world, device)
        if last or done % args.save_every == 0 or stop["requested"]:
            checkpoint_now(done)
        if stop["requested"]:
            print0(f"SIGTERM: checkpoint written at step {done}, exiting", rank=rank)
            break
        if out_of_time:
            print0(f"--max-minutes {args.max_minutes}: stopped at step {done} of {total_steps}", rank=rank)
            break
    bar.close()
    signal.signal(signal.SIGTERM, previous)  # the caller's handler again (main called in-process: tests)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        # A DataLoader worker's error arrives wrapped in its traceback: its last line is the message.
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('data.UserError: ')}", file=sys.stderr)
        sys.exit(2)
