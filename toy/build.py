"""Rebuild the toy world from a seed: a tiny SD3-architecture pipeline trained here, its samples labelled by the
oracle as an HPDv3 preference set, and a DRM trained on that set by reward_train.py (the real data path).

1. Data: renders of train prompts, degraded in quality (blur, noise, smear at random strength 0.4-1; all of them
   by default), so the trained generator spreads in quality and leaves room to improve. Prompt-breaking
   degradations (recolour, move, drop) are off by default: renders that contradict their prompt teach the
   generator to ignore it.
2. VAE: a 16-latent-channel AutoencoderKL (64 px -> 16 x 16 latents), L1 + small KL; shift/scale set from the
   latent statistics, as SD3's are.
3. Transformer: SD3Transformer2DModel with SD3.5's features (dual attention, rms qk-norm), rectified-flow
   training (logit-normal t, v = eps - x0) on frozen random CLIP-L/CLIP-G/T5 text encoders (T5 reads the toy
   vocabulary as whole words); 10% empty prompts for classifier-free guidance.
4. Preference set: base samples (the diffusers pipeline, no CFG by default) for train and held-out prompts, pairs
   of samples of the same prompt, winner = higher oracle, confidence = 1 - exp(-gap / 0.05) (>= 0.95 iff gap >=
   0.15); for the train prompts also cross pairs against samples of a neighbour prompt (train_cross.json).
5. DRM: `reward_train.py` on those files (LoRA backbone on the cross pairs by default; --drm-modes compares
   several). OUT/assets then holds what the repo ships: the pipeline and the first DRM in fp16.

The defaults are the recipe of the shipped assets (toy/assets/build.json): 7.9 minutes of wall time on one H200
machine just started, Python's start (imports ~0.4 min there) and exit included (data and VAE 0.6 min, transformer
17,000 steps at batch 256 4.9 with its first compilation, samples and pairs 1.0, DRM 0.9, trained by reward_train's
main in this process; docs/toy/README.md round 15). That schedule teaches the word order of two-object prompts
(rounds 10 and 12), and sampled without CFG (--guidance 1) its base spreads in quality (held-out 0.61 +- 0.24 under
the oracle; round 15). Every stage runs a fixed number of steps (the DRM excepted: --drm-minutes), so a slower
machine builds the same generator, later.
The transformer stage saves OUT/transformer_checkpoint.pt every --checkpoint-every steps and on SIGTERM; the same
command with --resume goes on from it (a machine that stops commands at 10 minutes can run any budget that way).
A command of the later stages only (pairs, drm, assets) adds to the build.json the earlier ones wrote.

    python -m toy.build --out runs/toy                     # ~8 min on one H200; CPU works, slowly (or --quick)
    python -m toy.build --out runs/toy --quick             # a few minutes on CPU: tiny budgets, for testing; it
                                                           # ends at the DRM (its generator gives no pairs)
    python -m toy.build --out runs/toy --resume            # the same command after a stop: go on from the checkpoint
    python -m toy.build --out runs/toy --stages drm,assets # after a stop in the pairs or the DRM
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402

import reward_train  # noqa: E402
from data import UserError  # noqa: E402
from tiny_pipeline import tiny_tokenizers  # noqa: E402
from toy import world  # noqa: E402

MAX_SEQUENCE_LENGTH = 16  # T5 tokens: every toy prompt fits
T5_BIAS_SCALE = 10.0
CHECKPOINT = "transformer_checkpoint.pt"  # under OUT, while a transformer stage runs
# Flags a --resume run must repeat: they shape the pipeline or the transformer's schedule.
RESUME_FLAGS = ("seed", "num_images", "degraded_fraction", "degradations", "layers", "heads", "patch_size",
                "t5_candidates", "new_transformer", "new_text_encoder", "train_text_encoder", "steps",
                "transformer_minutes", "transformer_batch_size", "transformer_lr", "ema", "max_prompts")
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                   caption_projection_dim=128, pooled_projection_dim=96, pos_embed_max_size=16,
                   dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/toy", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a CPU smoke run of the stages up to the "
                   "pairs (its generator is too short-trained to give DRM pairs)")
    p.add_argument("--num-images", type=int, default=60000, help="training renders")
    p.add_argument("--degraded-fraction", type=float, default=1.0, help="share of renders degraded (strength "
                                                                         "0.4-1): the base model's quality spread")
    p.add_argument("--degradations", default="blur,noise,smear", help="kinds of degradation, comma-separated "
                   f"(known: {','.join(world.DEGRADATIONS)})")
    p.add_argument("--layers", type=int, default=TRANSFORMER["num_layers"], help="transformer blocks (a new "
                   "transformer only)")
    p.add_argument("--heads", type=int, default=TRANSFORMER["num_attention_heads"], help="attention heads of 32 "
                   "channels each: the transformer's width is 32 x heads (a new transformer only)")
    p.add_argument("--vae-steps", type=int, default=500, help="VAE training steps")
    p.add_argument("--steps", type=int, default=17000, help="transformer training steps (--transformer-minutes, "
                   "if given, caps them)")
    p.add_argument("--vae-minutes", type=float, default=0.0, help="cap on VAE training time (steps shrink to fit; "
                   "0: none)")
    p.add_argument("--transformer-minutes", type=float, default=0.0, help="cap on transformer training time (0: none, "
                   "--steps as given)")
    p.add_argument("--batch-size", type=int, default=256, help="VAE batch size")
    p.add_argument("--transformer-batch-size", type=int, default=256, help="transformer batch size")
    p.add_argument("--transformer-lr", type=float, default=4e-4, help="transformer peak learning rate")
    p.add_argument("--ema", type=float, default=0.0, help="decay of a moving average of the transformer weights, "
                   "saved instead of the last weights (0: off; 0.999 made no difference in a 984-step test)")
    p.add_argument("--train-text-encoder", action="store_true", help="train the T5 encoder with the transformer "
                   "(CLIP encoders stay frozen): a random frozen T5 barely marks word order, which two-object "
                   "prompts need")
    p.add_argument("--t5-candidates", type=int, default=1, help="with the vae stage: draw this many frozen T5s and "
                   "keep the one that marks word roles best (toy.build.probed_t5; 1: the first, as the shipped build)")
    p.add_argument("--new-text-encoder", action="store_true", help="with --new-transformer: a new T5 too (the "
                   "current recipe, new_t5), e.g. over a VAE saved by an older build")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the "
                   "transformer for its training, on a GPU (1.45x the steps in the same time on an H200)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True, help="on a GPU, capture "
                   "the transformer's training step as one CUDA graph and replay it (make_train_step; not with "
                   "--train-text-encoder)")
    p.add_argument("--new-transformer", action="store_true", help="with --stages transformer (no vae): train a "
                   "new transformer (--patch-size, --layers, --heads) over the saved VAE and text encoders")
    p.add_argument("--patch-size", type=int, choices=(1, 2), help="transformer patch size (1: 16 x 16 tokens); "
                   "default 1 for a new pipeline, the saved one's when continuing; another size than the saved "
                   "one trains a new transformer over the saved VAE and text encoders")
    p.add_argument("--samples-per-prompt", type=int, default=16, help="base samples per prompt for the pairs")
    p.add_argument("--sample-steps", type=int, default=20, help="denoising steps for the preference samples")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale for the preference samples (1: off; at "
                   "4.5 the toy base scores above the issue's 0.35-0.65, docs/toy/README.md round 11)")
    p.add_argument("--cross-pairs", type=int, default=48, help="per train prompt: extra pairs of one of its "
                   "samples against a sample of a neighbour prompt (one word changed), both scored under it")
    p.add_argument("--drm-steps", type=int, default=50000, help="DRM training steps (reward_train.py; "
                   "--drm-minutes caps them)")
    p.add_argument("--drm-minutes", type=float, default=0.75, help="cap on each DRM's training time (0: none)")
    p.add_argument("--drm-batch-size", type=int, default=128, help="DRM batch size (pairs)")
    p.add_argument("--drm-modes", default="lora@train_cross", help="DRMs to train, comma-separated MODE or MODE@PAIRS "
                   "(PAIRS: train or train_cross, the pairs file under prefs/); the first is shipped")
    p.add_argument("--drm-lr", default="2e-4", help="DRM learning rate(s): one, or one per --drm-modes entry")
    p.add_argument("--drm-args", default="", help="extra reward_train.py flags, e.g. '--backbone full'")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N train and N held-out prompts "
                   "(0: all; for smoke runs)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="transformer steps between checkpoints "
                   "(OUT/transformer_checkpoint.pt, also written on SIGTERM; 0: only then)")
    p.add_argument("--resume", action="store_true", help="go on with the transformer stage of a run that stopped "
                   "(the same command plus --resume): its VAE, T5, transformer, optimizer and schedule")
    p.add_argument("--stages", default="data,vae,transformer,pairs,drm,assets", help="which stages to run; "
                   "transformer without vae continues the saved pipeline's transformer")
    args = p.parse_args(argv)
    unknown = set(args.degradations.split(",")) - set(world.DEGRADATIONS)
    if unknown:
        p.error(f"--degradations: unknown {', '.join(sorted(unknown))}; known: {', '.join(world.DEGRADATIONS)}")
    if args.new_text_encoder and not args.new_transformer:
        p.error("--new-text-encoder needs --new-transformer: the saved transformer was trained on the saved T5")
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    for name in ("t5_candidates", "num_images", "vae_steps", "steps", "batch_size", "transformer_batch_size",
                 "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.num_images, args.vae_steps, args.steps, args.batch_size = 512, 30, 30, 32
        args.transformer_batch_size = 32
        args.samples_per_prompt, args.sample_steps, args.drm_steps, args.drm_minutes = 2, 4, 20, 0.0
        args.cross_pairs, args.drm_batch_size, args.max_prompts = 4, 16, args.max_prompts or 64
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Data

def worker_pool(workers):
    """A process pool whose workers take SIGTERM's default action: a worker forked from a process that handles
    SIGTERM (e.g. a training loop's preemption handler) would ignore the pool's terminate() and hang the exit of its
    with-block."""
    return Pool(workers, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL))


def _render_chunk(job):
    seed, prompts, degraded_fraction, kinds = job
    rng = np.random.default_rng(seed)
    images = []
    for prompt in prompts:
        img = world.render(prompt, rng)
        if rng.random() < degraded_fraction:
            img = world.degrade(img, kinds[rng.integers(len(kinds))], rng,
                                float(rng.uniform(0.4, 1.0)), prompt=prompt)
        images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return np.stack(images)


def make_training_images(prompts, num_images, seed, workers, degraded_fraction, kinds):
    """(N, 64, 64, 3) uint8 renders of random train prompts (a fraction degraded, by one of `kinds` each) and their
    prompts."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in rng.integers(len(prompts), size=num_images)]
    chunks = [(seed * 7919 + i, chosen[i:i + 1000], degraded_fraction, kinds) for i in range(0, num_images, 1000)]
    with worker_pool(workers) as pool:
        images = np.concatenate(pool.map(_render_chunk, chunks))
    return images, chosen


def to_pixels(images):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# 2-3. The pipeline

def transformer_config(patch_size=2, layers=TRANSFORMER["num_layers"], heads=TRANSFORMER["num_attention_heads"]):
    """The toy transformer's config: the first half of the blocks (at most 3) with SD3.5's dual attention."""
    return TRANSFORMER | dict(patch_size=patch_size, num_layers=layers, num_attention_heads=heads,
                              caption_projection_dim=32 * heads,
                              dual_attention_layers=tuple(range(min(3, layers // 2))))


def new_t5(vocab_size):
    """The frozen random T5. Its relative-position biases are scaled up (T5_BIAS_SCALE) over 32 buckets, so each
    word's output mixes in its neighbours by offset: a colour word then carries its role in the prompt (before or
    after "above", ...). A linear probe reads the spatial role of each colour word of held-out two-object prompts
    from the word's output at 0.76-1.0 (mean 0.95 over 60 inits; chance 0.25) this way, at 0.32 with T5's default
    init (8 buckets, one init), and the colour itself at 1.0 in both; the generator needs the role to put the
    objects in the named order."""
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=32))
    with torch.no_grad():
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(T5_BIAS_SCALE)
    return t5.eval()  # eval: no dropout in the embeddings the transformer learns from (nor in sampling)


def role_probe_accuracy(t5, tokenizer, fit_prompts, test_prompts):
    """Accuracy on test_prompts of a ridge probe, fitted on fit_prompts, that reads from the T5 output at each colour
    word of a two-object prompt where that object goes (top, bottom, left, right; chance 0.25). Prompts without a
    relation are skipped."""
    roles = {"above": (0, 1), "below": (1, 0), "left of": (2, 3), "right of": (3, 2)}
    colour_ids = {tokenizer.convert_tokens_to_ids("\u2581" + c) for c in world.COLOURS}

    def features(prompts):
        prompts = [p for p in prompts if world.parse_prompt(p)["relation"]]
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = t5(ids)[0].float().numpy()
        x, y = [], []
        for k, prompt in enumerate(prompts):
            x += [hidden[k, i] for i, t in enumerate(ids[k].tolist()) if t in colour_ids]
            y += roles[world.parse_prompt(prompt)["relation"]]
        return np.array(x), np.array(y)

    (x_fit, y_fit), (x_test, y_test) = features(fit_prompts), features(test_prompts)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    a, b = (np.c_[(x - mu) / sd, np.ones(len(x))] for x in (x_fit, x_test))
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(4)[y_fit])
    return float((np.argmax(b @ w, 1) == y_test).mean())


def probed_t5(tokenizer, candidates, seed):
    """new_t5, or with candidates > 1 the one of that many inits whose role probe reads best (fitted on half the
    train prompts, read on the other half: held-out prompts stay unseen). The global RNG is left as one new_t5 call
    leaves it, so the rest of the pipeline draws the same weights for any number of candidates. -> (t5, report)."""
    t5 = new_t5(len(tokenizer))
    if candidates <= 1:
        return t5, None
    after = torch.get_rng_state()
    train = world.split_prompts()[0]
    scored = [(role_probe_accuracy(t5, tokenizer, train[::2], train[1::2]), t5)]
    for i in range(1, candidates):
        torch.manual_seed(seed * 7919 + i)
        t5 = new_t5(len(tokenizer))
        scored.append((role_probe_accuracy(t5, tokenizer, train[::2], train[1::2]), t5))
    torch.set_rng_state(after)
    chosen = max(range(candidates), key=lambda i: scored[i][0])  # the first of equals
    return scored[chosen][1], dict(probes=[round(a, 4) for a, _ in scored], chosen=chosen)


def new_pipeline(seed, patch_size=2, layers=TRANSFORMER["num_layers"], heads=TRANSFORMER["num_attention_heads"],
                 t5_candidates=1):
    """A new toy pipeline, all weights random (seeded); -> (pipeline, the T5 choice's report or None)."""
    torch.manual_seed(seed)
    words = sorted({w for p in world.all_prompts() for w in p.split()})
    clip_tok, t5_tok = tiny_tokenizers(words)
    t5_tok.model_max_length = MAX_SEQUENCE_LENGTH  # recorded in the pipeline: samplers default to it

    def clip_encoder(width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=width, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))

    # CLIP-L 32 + CLIP-G 64 = 96 = pooled width, zero-padded to the T5 width 128 = joint_attention_dim.
    t5, t5_report = probed_t5(t5_tok, t5_candidates, seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 128],
                        layers_per_block=1, latent_channels=16, norm_num_groups=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**transformer_config(patch_size, layers, heads)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=clip_encoder(32), tokenizer=clip_tok, text_encoder_2=clip_encoder(64),
        tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok), t5_report


def fit_steps(planned, budget_s, spent_s, per_step_s, done):
    """The step count that fits a time budget: `done` steps took `spent_s`, the rest take `per_step_s` each; never
    more than planned, and at least done + 1 below it (a loop past its budget stops after one more step)."""
    left = budget_s - spent_s
    return min(planned, done + max(1, int(left / per_step_s)))


class TimeBudget:
    """Steps of a training loop fitted to `minutes`, re-fitted every `every` steps from the speed since warm-up (the
    first `warm` steps of an attempt pay for kernel selection). Re-fitting matters: the speed drifts, and an H200 run
    whose count was fitted once, from steps 30-80, planned 14,941 steps for 7.2 minutes and needed ~10.5. `spent`:
    seconds of the attempts before this one (a resumed run). minutes <= 0: no budget, the planned steps."""

    def __init__(self, planned, minutes, start_step=0, spent=0.0, warm=30, every=50):
        self.planned, self.budget = planned, minutes * 60
        self.warm_step, self.every, self.t0, self.spent = start_step + warm, every, time.time(), spent
        self.t_warm = None

    def seconds(self):
        return self.spent + time.time() - self.t0

    def fit(self, step, total):
        """The step count after `step` steps (`total` until the speed is known)."""
        if step == self.warm_step:
            self.t_warm = time.time()
        if self.budget <= 0 or self.t_warm is None or step < self.warm_step + self.every or step % self.every:
            return total  # no budget (minutes 0), or not a re-fit step
        per_step = (time.time() - self.t_warm) / (step - self.warm_step)
        return fit_steps(self.planned, self.budget, self.seconds(), per_step, step)


def cosine_lr(optimizer, step, total, peak, warmup=200):
    lr = peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # a captured step reads it on the device
        else:
            group["lr"] = lr


def train_vae(vae, images, args, device):
    """Reconstruction (L1) + a small KL; returns the last losses."""
    vae.train().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device).manual_seed(args.seed + 1)
    images = torch.from_numpy(images).to(device)  # uint8 on the device: batches are gathered there
    total, budget, step = args.vae_steps, TimeBudget(args.vae_steps, args.vae_minutes), 0
    while step < total:
        idx = torch.randint(len(images), (args.batch_size,), generator=g, device=device)
        x = images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        cosine_lr(optimizer, step, total, 1e-3)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon.float(), x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        total = budget.fit(step, total)
        if step % 500 == 0:
            print(f"vae step {step}/{total} l1 {loss.item():.4f}", flush=True)
    vae.eval()
    return dict(l1=loss.item(), steps=step)


@torch.no_grad()
def encode_all(vae, images, device, batch=512):
    return torch.cat([vae.encode(to_pixels(images[i:i + batch]).to(device)).latent_dist.mean.float().cpu()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def prompt_table(pipe, prompts, device):
    """Embeddings of each distinct prompt (and of "", for CFG dropout), computed once."""
    distinct = sorted(set(prompts)) + [""]
    embeds, pooled = [], []
    for i in range(0, len(distinct), 256):
        e, _, p, _ = pipe.encode_prompt(prompt=distinct[i:i + 256], prompt_2=None, prompt_3=None, device=device,
                                        do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
        embeds.append(e.float())
        pooled.append(p.float())
    return {p: i for i, p in enumerate(distinct)}, torch.cat(embeds), torch.cat(pooled)


def t5_ids(pipe, prompts, device):
    """T5 token ids (P, MAX_SEQUENCE_LENGTH), padded as the pipeline pads them."""
    return pipe.tokenizer_3(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(device)


def flow_matching_loss(forward, x0, eps, t, context, pooled):
    """Rectified flow at timestep 1000 t: x_t = (1 - t) x0 + t eps, MSE of the prediction against v = eps - x0 (the
    forward in bf16 autocast on a GPU)."""
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        v = forward(hidden_states=xt, encoder_hidden_states=context, pooled_projections=pooled, timestep=1000 * t,
                    return_dict=False)[0]
    return F.mse_loss(v.float(), eps - x0)


def transformer_optimizer(params, lr, device, graphed):
    """AdamW for the transformer: fused on a GPU; for a captured step (graphed) also capturable, with the learning
    rate a device tensor that cosine_lr fills in place."""
    if graphed:
        lr = torch.tensor(lr, device=device)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda", capturable=graphed)


def make_train_step(forward, params, optimizer, graphed, warmup=3):
    """step(batch) -> loss: one optimisation step (flow-matching loss, backward, grad clip 1.0, AdamW) on `batch` =
    (x0, eps, t, context, pooled); the loss is a GPU scalar, nothing waits for it.

    graphed: the first `warmup` steps run as usual on a side stream (torch.compile compiles there), then the whole
    step is captured once as a CUDA graph and every later step copies its batch into the graph's inputs and replays
    it. The toy transformer's step is launch-bound, so this removes most of its time
    (bench/bench_toy_transformer.py); the batches and learning rates are the same, so it trains the same model up to
    rounding. The batch's shapes must not change; the optimizer must come from transformer_optimizer(graphed=True)."""
    def eager(batch):
        loss = flow_matching_loss(forward, *batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if not graphed:
        return eager
    graph, side, state = torch.cuda.CUDAGraph(), torch.cuda.Stream(), dict(calls=0, inputs=None, loss=None)

    def step(batch):
        state["calls"] += 1
        if state["calls"] <= warmup:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = eager(batch)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if state["inputs"] is None:  # capture (records the kernels, runs nothing); the grads it makes stay put
            state["inputs"] = [b.clone() for b in batch]
            with torch.cuda.graph(graph):
                loss = flow_matching_loss(forward, *state["inputs"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            state["loss"] = loss.detach()
        for static, b in zip(state["inputs"], batch):
            static.copy_(b)
        graph.replay()
        return state["loss"].clone()  # the next replay overwrites the graph's own

    return step


def train_transformer(pipe, latents, prompts, args, device, report, checkpoint=None):
    """Rectified flow: x_t = (1 - t) x0 + t eps, predict v = eps - x0 at timestep 1000 t, t logit-normal.
    With --train-text-encoder the T5 tokens (the last MAX_SEQUENCE_LENGTH of the context) are recomputed with
    gradients each step; the CLIP tokens and pooled embeddings come from the frozen table.
    Every --checkpoint-every steps, and on SIGTERM (then it exits), OUT/transformer_checkpoint.pt keeps what a
    --resume run needs: the trained VAE, T5 and transformer, optimizer, batch generator, step, spent time and
    `report` so far. `checkpoint`: such a file's contents, to go on from."""
    transformer = pipe.transformer.train().to(device)
    index, embeds, pooled = prompt_table(pipe, prompts, device)
    ids = torch.tensor([index[p] for p in prompts])
    empty = index[""]
    params = list(transformer.parameters())
    if args.train_text_encoder:
        t5 = pipe.text_encoder_3.requires_grad_(True).to(device)  # eval mode: no dropout, as in sampling
        token_ids = t5_ids(pipe, sorted(index, key=index.get), device)  # (P, L) in table order
        params += list(t5.parameters())
    # Fused AdamW and no per-step host sync (the loss is read when printed): 1.5-1.9x the steps per second on an
    # H200; the whole step as one CUDA graph: another 3.2x, the same losses (bench/bench_toy_transformer.py).
    graphed = args.cuda_graph and device.type == "cuda" and not args.train_text_encoder
    optimizer = transformer_optimizer(params, args.transformer_lr, device, graphed)
    forward = torch.compile(transformer) if args.compile and device.type == "cuda" else transformer
    train_step = make_train_step(forward, params, optimizer, graphed)
    ema = [p.detach().clone() for p in params] if args.ema else None
    # A continued run (--stages transformer) draws other batches than the run it continues.
    g = torch.Generator(device).manual_seed(args.seed + 2 + 1000 * ("vae" not in args.stages.split(",")))
    losses, total, step, spent = [], args.steps, 0, 0.0
    if checkpoint:  # the weights were restored with the pipeline (restore_pipeline)
        lr, capturable = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["capturable"]
        optimizer.load_state_dict(checkpoint["optimizer"])
        optimizer.param_groups[0].update(lr=lr, capturable=capturable)  # this run's step kind, not the saved one's
        if ema is not None:
            torch._foreach_copy_(ema, [e.to(device) for e in checkpoint["ema"]])
        g.set_state(checkpoint["generator"])
        losses, total, step, spent = (checkpoint[k] for k in ("losses", "total", "step", "seconds"))
        losses = [torch.tensor(x, device=device) for x in losses]
        print(f"transformer: resumed at step {step}/{total} ({spent:.0f} s spent)", flush=True)
    budget = TimeBudget(args.steps, args.transformer_minutes, step, spent)
    path = os.path.join(args.out, CHECKPOINT)

    def save():
        state = dict(transformer=transformer.state_dict(), text_encoder_3=pipe.text_encoder_3.state_dict(),
                     vae=pipe.vae.state_dict(), vae_config=dict(shift_factor=pipe.vae.config.shift_factor,
                                                                scaling_factor=pipe.vae.config.scaling_factor),
                     optimizer=optimizer.state_dict(), ema=ema, generator=g.get_state(), step=step, total=total,
                     losses=[float(x) for x in losses[-100:]], seconds=budget.seconds(), report=report,
                     args={name: getattr(args, name) for name in RESUME_FLAGS},
                     new_pipeline="vae" in args.stages.split(","))
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a run killed while saving keeps the previous checkpoint

    stop = dict(requested=False)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))  # preemption: save, then exit
    latents, ids, n = latents.to(device), ids.to(device), args.transformer_batch_size
    try:
        while step < total:
            idx = torch.randint(len(latents), (n,), generator=g, device=device)
            x0 = latents[idx]
            cond = torch.where(torch.rand(n, generator=g, device=device) < 0.1, empty, ids[idx])
            t = torch.sigmoid(torch.randn(n, generator=g, device=device))
            eps = torch.randn(x0.shape, generator=g, device=device)
            cosine_lr(optimizer, step, total, args.transformer_lr)
            context = embeds[cond]
            if args.train_text_encoder:  # encode each distinct prompt of the batch once
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    distinct, where = torch.unique(cond, return_inverse=True)
                    t5_tokens = t5(token_ids[distinct])[0][where]  # (n, L, joint_attention_dim)
                context = torch.cat([context[:, :-MAX_SEQUENCE_LENGTH], t5_tokens.to(context.dtype)], dim=1)
            loss = train_step((x0, eps, t, context, pooled[cond]))
            if ema is not None:  # warm-up: a short average at first, so early weights fade
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(args.ema, (1 + step) / (10 + step)))
            losses = losses[-99:] + [loss]  # GPU scalars: no host sync here
            step += 1
            total = budget.fit(step, total)
            if step % 1000 == 0:
                print(f"transformer step {step}/{total} loss {float(torch.stack(losses).mean()):.4f}", flush=True)
            if stop["requested"] or args.checkpoint_every and step % args.checkpoint_every == 0 and step < total:
                save()
                if stop["requested"]:
                    raise SystemExit(f"transformer: stopped at step {step}/{total}, saved {path}; the same command "
                                     "with --resume goes on from there")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if ema is not None:
        torch._foreach_copy_([p.data for p in params], ema)
    transformer.eval()
    pipe.text_encoder_3.requires_grad_(False)
    return dict(loss=float(torch.stack(losses).mean()), steps=step, text_encoder_trained=args.train_text_encoder,
                seconds=round(budget.seconds(), 1), patch_size=transformer.config.patch_size,
                blocks=len(transformer.transformer_blocks), batch=n, lr=args.transformer_lr,
                compiled=forward is not transformer, cuda_graph=graphed)


def restore_pipeline(pipe, checkpoint):
    """Put a transformer checkpoint's VAE, T5 and transformer weights into `pipe` (built as the run that saved it
    built its pipeline)."""
    pipe.vae.load_state_dict(checkpoint["vae"])
    pipe.vae.register_to_config(**checkpoint["vae_config"])
    pipe.text_encoder_3.load_state_dict(checkpoint["text_encoder_3"])
    pipe.transformer.load_state_dict(checkpoint["transformer"])
    pipe.vae.eval()  # as train_vae leaves it


def load_checkpoint(args):
    """OUT/transformer_checkpoint.pt for --resume, checked against this run's flags."""
    path = os.path.join(args.out, CHECKPOINT)
    if "transformer" not in args.stages.split(","):
        raise SystemExit("--resume goes on with a transformer stage: --stages must include transformer")
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no {path} (a transformer stage that stops early leaves one; a finished one "
                         "leaves OUT/pipeline, for --stages pairs,drm,assets without --resume)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for name in RESUME_FLAGS:
        if checkpoint["args"][name] != getattr(args, name):
            raise SystemExit(f"--resume {path}: the checkpoint has --{name.replace('_', '-')} "
                             f"{checkpoint['args'][name]}, this run has {getattr(args, name)}")
    if checkpoint["new_pipeline"] != ("vae" in args.stages.split(",")):
        raise SystemExit(f"--resume {path}: it was saved by a run {'with' if checkpoint['new_pipeline'] else 'without'}"
                         " the vae stage; give --stages as that run did")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# 4. Samples and the preference set

@torch.no_grad()
def sample(pipe, prompts, seed, steps, guidance, batch=256):
    """uint8 (N, 64, 64, 3) samples of the diffusers pipeline, one generator seed per prompt index."""
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="sample", mininterval=5):
        chunk = prompts[i:i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                      generator=generators, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def confidence(gap):
    return 1 - math.exp(-abs(gap) / 0.05)


def same_prompt_pairs(count, per_prompt):
    """(a, b), a < b, over the samples of each prompt: samples start .. start + per_prompt - 1 share one prompt."""
    for start in range(0, count, per_prompt):
        for a in range(start, start + per_prompt):
            for b in range(a + 1, start + per_prompt):
                yield a, b


def save_pngs(folder, paths, images):
    from PIL import Image
    for path, img in zip(paths, images):
        Image.fromarray(img).save(os.path.join(folder, path))


def write_pairs(folder, name, prompts, images, scores, per_prompt, pool=None, chunk=1000):
    """All pairs among the samples of each prompt, winner first; PNGs under folder/images/name/ (written in chunks
    over `pool` if one is given)."""
    os.makedirs(os.path.join(folder, "images", name), exist_ok=True)
    paths = [f"images/{name}/{i:06d}.png" for i in range(len(images))]
    jobs = [(folder, paths[i:i + chunk], images[i:i + chunk]) for i in range(0, len(images), chunk)]
    if pool is None:
        for job in jobs:
            save_pngs(*job)
    else:
        pool.starmap(save_pngs, jobs)
    records = []
    for a, b in same_prompt_pairs(len(prompts), per_prompt):
        if scores[a] == scores[b]:
            continue
        win, lose = (a, b) if scores[a] > scores[b] else (b, a)
        records.append(dict(prompt=prompts[a], path1=paths[win], path2=paths[lose],
                            confidence=round(confidence(scores[a] - scores[b]), 4),
                            oracle1=round(float(scores[win]), 4), oracle2=round(float(scores[lose]), 4)))
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(records, f)
    return records, paths


def neighbours(prompts):
    """For each prompt, the indices of the prompts that differ from it in exactly one word."""
    words = [p.split() for p in prompts]
    by_len = {}
    for i, w in enumerate(words):
        by_len.setdefault(len(w), []).append(i)
    out = []
    for w in words:
        out.append([j for j in by_len[len(w)] if sum(a != b for a, b in zip(w, words[j])) == 1])
    return out


def oracle_terms(images, prompts, pool=None, chunk=1000):
    """world.score_terms, in chunks over a multiprocessing pool if one is given (the pairs stage scores ~65,000
    images: about a minute on one core)."""
    if pool is None:
        return world.score_terms(images, prompts)
    parts = pool.starmap(world.score_terms, [(images[i:i + chunk], prompts[i:i + chunk])
                                             for i in range(0, len(images), chunk)])
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def cross_pairs(prompts, paths, images, scores, per_prompt, count, rng, pool=None):
    """`count` pairs per prompt: one of its own samples against a sample drawn for a neighbour prompt (one word
    changed: a colour, shape, position or relation), the borrowed sample scored by the oracle under THIS prompt.
    Both images are base samples; the pairs teach whether an image fits its prompt."""
    unique = prompts[::per_prompt]
    near = neighbours(unique)
    own, borrowed, prompt_of = [], [], []
    for u, p in enumerate(unique):
        if not near[u]:
            continue
        for _ in range(count):
            own.append(u * per_prompt + int(rng.integers(per_prompt)))
            borrowed.append(int(rng.choice(near[u])) * per_prompt + int(rng.integers(per_prompt)))
            prompt_of.append(p)
    if not own:
        return []
    cross = world.combine(oracle_terms(images[borrowed], prompt_of, pool))
    records = []
    for a, b, p, sb in zip(own, borrowed, prompt_of, cross):
        if scores[a] == sb:
            continue
        (win, sw), (lose, sl) = sorted([(a, scores[a]), (b, sb)], key=lambda x: -x[1])
        records.append(dict(prompt=p, path1=paths[win], path2=paths[lose], confidence=round(confidence(sw - sl), 4),
                            oracle1=round(float(sw), 4), oracle2=round(float(sl), 4), kind="cross"))
    return records


def deciding_shares(terms, scores, per_prompt):
    """Share of the confident own-prompt pairs (gap >= 0.15) decided by each oracle term, and each term's mean over
    the samples (`terms`: world.score_terms of them): whether pairs turn on differences a model can see."""
    from toy.evaluate import TERMS, deciding_terms
    win, lose = [], []
    for a, b in same_prompt_pairs(len(scores), per_prompt):
        if abs(scores[a] - scores[b]) >= 0.15:
            win.append(a if scores[a] > scores[b] else b)
            lose.append(b if scores[a] > scores[b] else a)
    decided = deciding_terms(terms, np.array(win, dtype=int), np.array(lose, dtype=int))
    return dict(decided_by={t: round(float((decided == t).mean()), 3) for t in TERMS if len(decided)},
                term_means={t: round(float(terms[t].mean()), 3) for t in TERMS})


def summary(scores):
    return dict(mean=round(float(scores.mean()), 4), std=round(float(scores.std()), 4), n=int(len(scores)))


# ----------------------------------------------------------------------------------------------------------------

def drm_name(entry):
    mode, _, pairs = entry.partition("@")
    return f"drm_{mode}" + (f"_{pairs}" if pairs and pairs != "train" else "")


def drm_flags(args, entry, lr):
    """reward_train.py's flags for one --drm-modes entry (MODE or MODE@PAIRS) of the build in args.out."""
    mode, _, pairs = entry.partition("@")
    prefs = os.path.join(args.out, "prefs")
    return ["--model", os.path.join(args.out, "pipeline"), "--backbone", mode,
            "--train-data", os.path.join(prefs, f"{pairs or 'train'}.json"),
            "--test-data", os.path.join(prefs, "test.json"), "--resolution", "64",
            "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--skip-last-blocks", "1", "--lr", lr,
            "--batch-size", str(args.drm_batch_size), "--max-steps", str(args.drm_steps),
            "--max-minutes", str(args.drm_minutes), "--eval-every", "0", "--save-every", "500",
            "--num-workers", str(min(6, os.cpu_count() or 1)), "--seed", str(args.seed),
            "--eval-pairs", "3000", "--eval-batch-size", "256", "--prompt-cache", "4096",
            # the shipped DRM's sampling (continuous logit-normal), not reward_train's default (the authors' grid
            # recipe, which trained the demo's DRM far worse in the same steps: docs/RESULTS.md)
            "--timestep-sampling", "logit_normal",
            "--out", os.path.join(args.out, drm_name(entry)), *args.drm_args.split()]


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    stages, t_start = set(args.stages.split(",")), time.time()
    built = os.path.join(args.out, "build.json")
    # Later stages of a build (pairs, drm, assets: e.g. after a stop) add to the report it wrote so far; a new or
    # continued generator starts a new report (the old one's samples and DRMs do not describe it).
    earlier = json.load(open(built)) if os.path.isfile(built) else {}
    report = {} if stages & {"vae", "transformer"} else earlier
    train_prompts, held_out = (prompts[:args.max_prompts or None] for prompts in world.split_prompts())
    pipeline_dir = os.path.join(args.out, "pipeline")

    first_drm = os.path.join(args.out, drm_name(args.drm_modes.split(",")[0]), "drm.safetensors")
    for stage, needed, makers in (("pairs", os.path.join(pipeline_dir, "model_index.json"), {"vae", "transformer"}),
                                  ("drm", os.path.join(args.out, "prefs", "train.json"), {"pairs"}),
                                  ("assets", first_drm, {"drm"})):
        if stage in stages and not stages & makers and not os.path.isfile(needed):
            raise SystemExit(f"--stages {stage}: no {needed} (the {'/'.join(sorted(makers))} stage writes it; run that "
                             "first or add it to --stages)")
    checkpoint = load_checkpoint(args) if args.resume else None
    if "vae" in stages or "transformer" in stages:  # both need the renders ("data")
        t0 = time.time()
        images, prompts = make_training_images(train_prompts, args.num_images, args.seed, os.cpu_count() or 1,
                                               args.degraded_fraction, args.degradations.split(","))
        report["data"] = dict(images=len(images), seconds=round(time.time() - t0, 1),
                              oracle=summary(world.score(images[:2000], prompts[:2000])))
        print(f"1. data: {report['data']}", flush=True)
        if "vae" in stages:  # a new pipeline: train the VAE, then the transformer from scratch
            pipe, t5_report = new_pipeline(args.seed, args.patch_size or 1, args.layers, args.heads,
                                           args.t5_candidates)
            if t5_report:
                report["t5"] = t5_report
                print(f"   t5: role probe of {args.t5_candidates} inits {t5_report['probes']}, kept "
                      f"{t5_report['chosen']}", flush=True)
            t0 = time.time()
            if checkpoint:  # the VAE of the run that stopped
                restore_pipeline(pipe, checkpoint)
                report["vae"] = checkpoint["report"]["vae"]
                print(f"2. vae: restored from {CHECKPOINT}", flush=True)
            else:
                report["vae"] = train_vae(pipe.vae, images, args, device)
            latents = encode_all(pipe.vae.to(device), images, device)  # a restored VAE is on the CPU
            # SD3 convention: x0 = (mean - shift) * scale, with the latents' own mean and spread.
            shift, scale = float(latents.mean()), float(1 / latents.std())
            pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
            if not checkpoint:
                report["vae"].update(shift_factor=shift, scaling_factor=scale, seconds=round(time.time() - t0, 1))
                print(f"2. vae: {report['vae']}", flush=True)
        else:  # --stages transformer: go on training the saved pipeline's transformer (same VAE and encoders)
            if not os.path.isfile(os.path.join(pipeline_dir, "model_index.json")):
                raise SystemExit(f"--stages without vae continues {pipeline_dir}, which holds no pipeline")
            pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
            if args.new_transformer or args.patch_size and args.patch_size != pipe.transformer.config.patch_size:
                torch.manual_seed(args.seed)
                pipe.register_modules(transformer=SD3Transformer2DModel(**transformer_config(
                    args.patch_size or pipe.transformer.config.patch_size, args.layers, args.heads)))
                if args.new_text_encoder:
                    pipe.register_modules(text_encoder_3=new_t5(pipe.text_encoder_3.config.vocab_size))
            if checkpoint:  # the stopped run's weights; what it continued is in its report
                restore_pipeline(pipe, checkpoint)
                report["continued_from"] = checkpoint["report"].get("continued_from")
            else:
                report["continued_from"] = earlier.get("transformer")
            latents = encode_all(pipe.vae.to(device), images, device)
            shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
        if "transformer" in stages:
            pipe.to(device)
            report["transformer"] = train_transformer(pipe, (latents - shift) * scale, prompts, args, device,
                                                      report, checkpoint)
            print(f"3. transformer: {report['transformer']}", flush=True)
        pipe.to("cpu").to(torch.float16).save_pretrained(pipeline_dir)
        if "transformer" in stages and os.path.isfile(os.path.join(args.out, CHECKPOINT)):
            os.remove(os.path.join(args.out, CHECKPOINT))  # the pipeline holds the finished stage
        del images, latents

    if "pairs" in stages:
        t0 = time.time()
        pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, dtype=torch.float32).to(device)
        pipe.set_progress_bar_config(disable=True)
        prefs = os.path.join(args.out, "prefs")
        with worker_pool(min(16, os.cpu_count() or 1)) as pool:
            for name, plist, seed in (("train", train_prompts, args.seed * 1000 + 10), ("test", held_out,
                                                                                       args.seed * 1000 + 20)):
                prompts = [p for p in plist for _ in range(args.samples_per_prompt)]
                images = sample(pipe, prompts, seed * 100_000, args.sample_steps, args.guidance)
                terms = oracle_terms(images, prompts, pool)
                scores = world.combine(terms)
                records, paths = write_pairs(prefs, name, prompts, images, scores, args.samples_per_prompt, pool)
                report[f"samples_{name}"] = summary(scores) | dict(
                    pairs=len(records), pairs_conf95=sum(r["confidence"] >= 0.95 for r in records),
                    **deciding_shares(terms, scores, args.samples_per_prompt))
                if name == "train" and args.cross_pairs:  # held-out pairs stay own-prompt pairs only
                    cross = cross_pairs(prompts, paths, images, scores, args.samples_per_prompt, args.cross_pairs,
                                        np.random.default_rng(args.seed), pool)
                    with open(os.path.join(prefs, "train_cross.json"), "w") as f:
                        json.dump(records + cross, f)
                    report["samples_train"].update(cross_pairs=len(cross),
                                                   cross_conf95=sum(r["confidence"] >= 0.95 for r in cross))
                print(f"4. {name} samples: {report[f'samples_{name}']}", flush=True)
        report["pairs_seconds"] = round(time.time() - t0, 1)

    if "drm" in stages:
        prefs = os.path.join(args.out, "prefs")
        with open(os.path.join(prefs, "train.json")) as f:
            if not json.load(f):
                raise SystemExit("no training pairs: the generator gives no score differences (--quick?)")
        entries = args.drm_modes.split(",")
        lrs = args.drm_lr.split(",")
        if len(lrs) not in (1, len(entries)):
            raise SystemExit(f"--drm-lr: give one learning rate or one per --drm-modes entry ({len(entries)})")
        pipe = None  # the pairs stage's sampler: its GPU memory goes back before the DRMs train
        for i, entry in enumerate(entries):
            # The same steps and flags for every DRM, one after the other; the first entry's DRM is the shipped one.
            name, flags = drm_name(entry), drm_flags(args, entry, lrs[i % len(lrs)])
            print("5. python reward_train.py " + " ".join(flags), flush=True)
            t0 = time.time()
            try:  # reward_train's main in this process: no second start of Python and its imports (~15 s)
                reward_train.main(reward_train.parse_args(flags))
            except UserError as e:
                raise SystemExit(f"{name}: reward_train.py: {e}") from None
            with open(os.path.join(args.out, name, "metrics.jsonl")) as f:
                last_eval = [r for r in map(json.loads, f) if "eval" in r][-1]
            report[name] = dict(seconds=round(time.time() - t0, 1), step=last_eval["step"], **last_eval["eval"])
            print(f"5. {name}: {report[name]}", flush=True)

    report["seconds"], report["args"] = round(time.time() - t_start, 1), vars(args)
    with open(built, "w") as f:
        json.dump(report, f, indent=1)

    if "assets" in stages:
        # What the repo ships: the pipeline (fp16) and the first mode's DRM, cast to fp16 (scores match the fp32
        # DRM to ~1e-3; the config in its metadata is kept).
        from safetensors import safe_open
        from safetensors.torch import save_file
        assets = os.path.join(args.out, "assets")
        shutil.rmtree(assets, ignore_errors=True)
        shutil.copytree(pipeline_dir, os.path.join(assets, "pipeline"))
        source = os.path.join(args.out, drm_name(args.drm_modes.split(",")[0]), "drm.safetensors")
        with safe_open(source, framework="pt") as f:
            tensors = {k: f.get_tensor(k).half() for k in f.keys()}
            metadata = f.metadata()
        save_file(tensors, os.path.join(assets, "drm.safetensors"), metadata=metadata)
        shutil.copy(os.path.join(args.out, "build.json"), os.path.join(assets, "build.json"))

    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(parse_args())
