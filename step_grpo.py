"""Step-wise GRPO with dense DRM rewards (the paper's section 3) and terminal Flow-GRPO as the baseline.

--mode step (default): per prompt, roll out T SDE steps; at each step draw k candidates from the shared latent
(one policy forward, k noises), score all k with the DRM at their own timestep 1000 * sigma_next, and normalise
within the k: A_t^i = (R_i - mean) / (std + eps). The trajectory continues from a random (or the best) candidate.
--mode grpo: Flow-GRPO's SD3 recipe by default: G = 24 whole SDE trajectories per prompt, one terminal reward
(DRM at t = 0 on the final latent), A = (r - prompt mean) / (std of all the step's rewards on all ranks + 1e-4)
clamped to [-5, 5], the same A at every step. Both modes share the rest: PPO-clip on exp(logp - logp_old) over the
first int(T * 0.99) = 9 of T = 10 steps, logp from Flow-GRPO's SDE step, the CFG-guided velocity (4.5, the
unconditional branch detached in the loss), their KL to the reference policy (the same transformer, LoRA off;
beta 0.01), LoRA r 32 / alpha 64 on the first attention, AdamW 3e-4, an EMA of the LoRA (0.9, every 8 steps) for
evaluation and the saved file, 128 T5 tokens. The frozen DRM reads the base weights of the generator's own
transformer (adapters disabled while it scores) and its own T5 length (encoded apart when the policy's differs).

Departures from the paper / Flow-GRPO (README.md has the full table of Flow-GRPO's settings against ours):
- One optimizer step per rollout batch of --prompts-per-step prompts (Flow-GRPO: 48 prompt groups per epoch, split
  into gradient-accumulated batches); a prompt's group lives on one rank, and it is normalised by its group's own
  mean (theirs: by the mean of every sample with the same prompt string, which is the same unless a prompt is drawn
  twice in one epoch). Samples whose advantage is zero at every step are trained on, not filtered out.
- The EMA is updated once per optimizer step when (n + 1) % --ema-every == 0 (theirs: once per training batch with
  the optimizer step's count, the same when one batch makes one step).
- The last block's context-query LoRA is left out: its output feeds only the discarded context stream (zero
  gradient, and DDP requires every trained parameter to get one); with B initialised to zero it changes nothing.
- --reward oracle (toy world only) decodes latents and scores them with the toy oracle (resized to 64 px). A noisy
  candidate (step mode) is scored on its one-step prediction of the clean latent, x - sigma * v, v from the base
  weights (LoRA off, as the frozen DRM reads them): one more transformer forward per candidate, where the DRM would
  run its prefix. The dense-oracle step mode thus isolates the algorithm from the DRM's errors.
- --continue defaults to random (the paper does not say; docs/RESULTS.md compares it with best). The trajectory then
  stays on the policy's own path, and the dense advantages still rank all k.
- No micro-batching: each step's policy forward sees all of the rank's latents at that step, as the rollout did,
  so the kernels and hence the log-probs match (ratio 1 at the first inner epoch). Use fewer prompts per rank.
- Noise comes from one generator per prompt, seeded by --seed, the step and the prompt's place in the step's
  global batch (prompt_generators): runs on 1 or N GPUs at the same --prompts-per-step draw the same samples and
  follow the same curve, and a resume needs no noise state.
- metrics.jsonl starts with an evaluation row at step 0, the base model before any update (fresh runs only); the
  other rows are training steps 1, 2, ... At each evaluation, OUT/reward.png plots the evaluation rewards against
  step and device-seconds (plot.py; it also overlays several runs' metrics.jsonl), and OUT/samples/step_N.png
  holds up to 8 of its samples with their scores (the same prompts and noise every time: before and after).

    python step_grpo.py --drm toy/assets/drm.safetensors --out runs/step_grpo
    python step_grpo.py --reward oracle --mode grpo --out runs/grpo_oracle
    torchrun --nproc_per_node=8 step_grpo.py --model /models/sd3.5-medium --drm runs/drm/drm.safetensors \\
        --prompts prompts.txt --eval-prompts eval.txt --out runs/step_grpo
"""
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import UserError, read_prompts
from model import add_lora, decode_latents, default_sequence_length, load_drm, load_pipeline, save_lora, sde_step
from plot import plot_runs, read_metrics
from reward_train import any_rank_says, print0, rank0_says, setup_distributed, truncate_metrics
from toy.world import score_tensor as oracle_of_images
from step_sample import predicted_clean, sde_candidates, velocity


@dataclass
class Args:
    model: str = field(default="toy/assets/pipeline", metadata={"help": "SD3/SD3.5 diffusers folder"})
    drm: str = field(default="", metadata={"help": "DRM checkpoint (required unless --reward oracle)"})
    reward: str = field(default="drm", metadata={"help": "drm | oracle (toy world: toy.world.score on images)"})
    mode: str = field(default="step", metadata={"help": "step (Step-GRPO, dense rewards) | grpo (terminal reward)"})
    prompts: str = field(default="", metadata={"help": "training prompt file; empty: the toy world's train prompts"})
    eval_prompts: str = field(default="", metadata={"help": "held-out prompt file; empty: the toy held-out prompts"})
    eval_num: int = field(default=64, metadata={"help": "evaluate on the first N held-out prompts (0: all)"})
    eval_batch_size: int = field(default=8, metadata={"help": "held-out prompts per evaluation batch and rank (the "
                                                              "toy model on a GPU is launch-bound: use 64)"})
    k: int = field(default=4, metadata={"help": "step mode: SDE candidates per step"})
    group: int = field(default=24, metadata={"help": "grpo mode: trajectories per prompt (Flow-GRPO: 24)"})
    continue_from: str = field(default="random", metadata={"help": "step mode: continue from a random | the best "
                                                                   "candidate"})
    steps: int = field(default=10, metadata={"help": "T: denoising steps of a training rollout (Flow-GRPO: 10)"})
    eval_steps: int = field(default=40, metadata={"help": "denoising steps of the evaluation (ODE) samples "
                                                          "(Flow-GRPO: 40)"})
    guidance: float = field(default=4.5, metadata={"help": "CFG scale of rollouts, loss and evaluation (Flow-GRPO: "
                                                           "4.5); unused with --no-cfg-in-loss"})
    cfg_in_loss: bool = field(default=True, metadata={"help": "the policy is the CFG-guided velocity, its "
                                                              "unconditional branch detached in the loss (Flow-GRPO's "
                                                              "train.cfg); --no-cfg-in-loss: the conditional model "
                                                              "alone at guidance 1 everywhere"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (Flow-GRPO: 0.7)"})
    clip_eps: float = field(default=1e-4, metadata={"help": "PPO clip range of the ratio (Flow-GRPO: 1e-4)"})
    adv_eps: float = field(default=1e-4, metadata={"help": "eps in A = (r - mean) / (std + eps) (Flow-GRPO: 1e-4)"})
    adv_std: str = field(default="global", metadata={"help": "grpo mode: the std that divides the advantages: global "
                                                             "= over all rewards of the optimizer step, every rank's "
                                                             "(Flow-GRPO's sample.global_std); group = within each "
                                                             "prompt's G. Step mode always normalises within the k"})
    adv_clip: float = field(default=5.0, metadata={"help": "clamp advantages to [-c, c] (Flow-GRPO's "
                                                           "train.adv_clip_max: 5); 0: off"})
    timestep_fraction: float = field(default=0.99, metadata={"help": "train on the first int(T * f) of the T "
                                                                     "recorded steps (Flow-GRPO: 0.99, 9 of 10)"})
    kl_beta: float = field(default=0.01, metadata={"help": "weight of Flow-GRPO's KL to the LoRA-off policy: "
                                                           "mean_CHW((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t = "
                                                           "a sqrt(sigma / (1 - sigma)) without the step's sqrt(-dt), "
                                                           "i.e. the step's Gaussian KL / |dt| (their configs: 0.01 "
                                                           "PickScore, 0.04 GenEval); 0: off"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank (Flow-GRPO: 32)"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (Flow-GRPO: 64)"})
    lora_attn2: bool = field(default=False, metadata={"help": "also adapt the second attention (attn2) of SD3.5's "
                                                              "dual-attention blocks (Flow-GRPO: attn only)"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate (Flow-GRPO: 3e-4)"})
    ema: float = field(default=0.9, metadata={"help": "EMA decay of the LoRA weights (Flow-GRPO: 0.9, warmed up as "
                                                      "min((1 + n) / (10 + n), decay)); evaluations and the saved "
                                                      "LoRA use the EMA weights; 0: off"})
    ema_every: int = field(default=8, metadata={"help": "update the EMA after every N-th optimizer step (Flow-GRPO: "
                                                        "8)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (Flow-GRPO: 1e-4)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (Flow-GRPO: 1.0)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per optimizer step, all ranks together "
                                                               "(a multiple of the number of ranks; Flow-GRPO: 48 "
                                                               "prompt groups per epoch)"})
    inner_epochs: int = field(default=1, metadata={"help": "updates on each rollout batch (Flow-GRPO: 1)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (rollout + update) to run"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop (evaluate, save) once training (rollouts and "
                                                              "updates; not evaluations) has run this long (0: no "
                                                              "limit): runs compared at equal training time"})
    eval_every: int = field(default=25, metadata={"help": "evaluate every N steps (and at the end); 0: end only"})
    save_every: int = field(default=25, metadata={"help": "checkpoint every N steps (and at the end)"})
    out: str = field(default="runs/step_grpo", metadata={"help": "output folder: checkpoint.pt, lora/, "
                                                                 "metrics.jsonl"})
    resume: str = field(default="", metadata={"help": "'latest' (OUT/checkpoint.pt, if any) or a checkpoint path"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    height: int = field(default=0, metadata={"help": "image height (0: Flow-GRPO's 512, or the pipeline's default "
                                                     "size when smaller)"})
    width: int = field(default=0, metadata={"help": "image width (0: as --height)"})
    max_sequence_length: int = field(default=0, metadata={"help": "T5 tokens of the policy's prompts (0: "
                                                                  "Flow-GRPO's 128, or the pipeline's own when "
                                                                  "shorter: 16 for the toy); the DRM always reads "
                                                                  "its own training length"})
    drm_skip_last_blocks: int = field(default=-1, metadata={"help": "m of an authors' DRM file (-1: 3 over 24 "
                                                                    "blocks, 5 over 38; our files record it)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute transformer blocks in backward"})


CHOICES = dict(reward=("drm", "oracle"), mode=("step", "grpo"), continue_from=("random", "best"),
               adv_std=("global", "group"))


def parse_args(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Args):
        flag = "--" + ("continue" if f.name == "continue_from" else f.name.replace("_", "-"))
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"],
                                dest=f.name)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"], dest=f.name,
                                choices=CHOICES.get(f.name))
    return Args(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------
# The math

def normalise_in_groups(rewards, eps=1e-4):
    """(R - mean) / (std + eps) within each row of rewards (P, n): the k candidates of one step's shared latent
    (Step-GRPO's A_t^i) or, with --adv-std group, a prompt's G terminal rewards. Population std, as numpy's."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + eps)


def normalise_by_global_std(rewards, all_rewards, eps=1e-4):
    """Flow-GRPO's advantage (sample.global_std): rewards (P, G) of this rank's prompts minus each prompt's mean,
    divided by the std of all_rewards, every rank's rewards of the optimizer step (population std, + eps)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (all_rewards.std(unbiased=False) + eps)


def clip_advantages(adv, clip):
    """Clamp to [-clip, clip] (Flow-GRPO's adv_clip_max); 0: unclamped. Within-k normalised advantages never exceed
    sqrt(k - 1) in size, so in step mode the clamp binds only for k > 26."""
    return adv.clamp(-clip, clip) if clip > 0 else adv


def flow_grpo_kl(mean, mean_ref, sigma, sigma_next, noise_level):
    """Flow-GRPO's KL term of one step: mean over rows of mean_CHW((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t =
    a sqrt(sigma / (1 - sigma)) (sigma_next in the denominator at sigma = 1) without the step's sqrt(-dt) factor:
    the exact Gaussian KL of the step divided by |dt|, so their beta means the same here."""
    sigma, sigma_next = torch.as_tensor(sigma, device=mean.device), torch.as_tensor(sigma_next, device=mean.device)
    std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))  # no host sync
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))).mean() / (2 * std_dev_t ** 2)


def ema_decay(step, decay):
    """Flow-GRPO's EMA decay after optimizer step `step`: warmed up as min((1 + step) / (10 + step), decay)."""
    return min((1 + step) / (10 + step), decay)


def ppo_clip_loss(logp, logp_old, adv, clip_eps):
    """PPO-clip on ratio = exp(logp - logp_old), all (N,). Returns (loss, mean |ratio - 1|, clipped fraction)."""
    ratio = torch.exp(logp - logp_old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)).mean()
    ratio_dev = (ratio - 1).abs().mean().detach()
    clip_frac = ((ratio - 1).abs() > clip_eps).float().mean().detach()
    return loss, ratio_dev, clip_frac


def prompt_generators(seed, step, first, count, device):
    """One noise generator per prompt of a rank's batch (prompts first .. first + count - 1 of the step's global
    batch), seeded by (seed, step, position): a prompt's noise does not depend on how the batch is split."""
    return [torch.Generator(device).manual_seed(((seed * 10_000_019 + step) * 100_003 + first + j) % 2 ** 63)
            for j in range(count)]


def per_prompt_randn(generators, rows, shape, device):
    """Normal noise (P * rows, *shape): `rows` consecutive rows per prompt, each prompt's from its own generator."""
    return torch.cat([torch.randn((rows, *shape), generator=g, device=device) for g in generators])


def candidate_log_probs(v, x, sigma, sigma_next, noise_level, candidates, k):
    """log-probs (B * k,) of k candidates per latent under the SDE step from x (B, ...) with velocity v (B, ...):
    one mean per latent, repeated for its k candidates (B * k, C, H, W). Also returns the means and stds."""
    _, logp, mean, std = sde_step(v.repeat_interleave(k, 0), x.repeat_interleave(k, 0), sigma, sigma_next,
                                  noise_level, x_next=candidates)
    return logp, mean, std


# ----------------------------------------------------------------------------------------------------------------
# Rewards, rollouts, the update

@contextlib.contextmanager
def base_weights(transformer):
    """The transformer without its LoRA: the frozen DRM's backbone and the KL's reference policy."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


@torch.no_grad()
def oracle_scores(vae, latents, prompts):
    """Toy-world oracle (N,) of latents (N, C, h, w): decoded, then toy.world.score_tensor (64 px, uint8)."""
    return oracle_of_images(decode_latents(vae, latents), prompts)


@torch.no_grad()
def drm_scores(latents, timestep, pos, pos_pooled, ctx):
    """DRM scores (N,) of latents (N, C, h, w) at `timestep`, read through the base weights (LoRA off)."""
    with base_weights(ctx["transformer"]), ctx["autocast"]():
        t = torch.full((len(latents),), float(timestep), device=latents.device)
        return ctx["drm"](latents.to(ctx["dtype"]), t, pos, pos_pooled).float()


@torch.no_grad()
def base_clean_prediction(latents, sigma, pos, pos_pooled, ctx):
    """One-step prediction of the clean latent from latents at noise level sigma: x - sigma * v (base weights)."""
    with base_weights(ctx["transformer"]), ctx["autocast"]():
        return predicted_clean(ctx["transformer"], latents.to(ctx["dtype"]), sigma, pos, pos_pooled).float()


def rewards_of(latents, timestep, prompts, pos, pos_pooled, ctx):
    """The training reward (N,): the DRM at `timestep`, or the oracle on the predicted clean latent; prompts / pos /
    pos_pooled per row."""
    if ctx["args"].reward == "oracle":
        clean = base_clean_prediction(latents, float(timestep) / 1000, pos, pos_pooled, ctx)
        return oracle_scores(ctx["pipe"].vae, clean, prompts)
    return drm_scores(latents, timestep, pos, pos_pooled, ctx)


def policy_embeddings(pos, pos_pooled, neg, neg_pooled, repeats, cfg):
    """Per-row embeddings of the policy's forward: [negative; positive] (2B, ...) with CFG, positive (B, ...) else."""
    rep = lambda t: t.repeat_interleave(repeats, 0)  # noqa: E731
    if cfg:
        return torch.cat([rep(neg), rep(pos)]), torch.cat([rep(neg_pooled), rep(pos_pooled)])
    return rep(pos), rep(pos_pooled)


def reward_embeddings(prompts, pos, pos_pooled, ctx):
    """Prompt embeddings for the reward: the policy's own when the DRM reads the same T5 length (and always for the
    oracle's clean prediction, made by the policy's base weights), else encoded again at the DRM's length."""
    if ctx["args"].reward == "oracle" or ctx["drm_length"] == ctx["length"]:
        return pos, pos_pooled
    return ctx["encode_for_drm"](prompts)


@torch.no_grad()
def rollout(prompts, ctx, generators):
    """Sample with the current policy and record every step. Returns (records, the policy's embeddings, log): a
    record holds the shared latents x (B, C, h, w), sigma, sigma_next, the candidates x_next (B * k, ...), their
    log-probs (B * k,) and advantages (B * k,). Every rank records exactly --steps records (DDP syncs on the last).
    generators: one per prompt (prompt_generators); rows of B and B * k are grouped by prompt, so each prompt's
    noise comes from its own generator."""
    args, transformer, dtype = ctx["args"], ctx["transformer"], ctx["dtype"]
    step_mode, device = args.mode == "step", ctx["device"]
    k, per_prompt = (args.k, 1) if step_mode else (1, args.group)
    p, guidance = len(prompts), args.guidance if args.cfg_in_loss else 1.0
    pos, neg, pos_pooled, neg_pooled = ctx["encode"](prompts)
    embeds, pooled = policy_embeddings(pos, pos_pooled, neg, neg_pooled, per_prompt, args.cfg_in_loss)
    r_pos, r_pooled = reward_embeddings(prompts, pos, pos_pooled, ctx)  # (P, ...): what the reward reads
    b = p * per_prompt  # shared latents: one per prompt (step) or one per trajectory (grpo), grouped by prompt
    x = per_prompt_randn(generators, per_prompt, ctx["latent_shape"], device)  # x_T (B, C, h, w)
    rows, records, log = torch.arange(b, device=device), [], {}
    for i in range(args.steps):
        sigma, sigma_next = ctx["sigmas"][i], ctx["sigmas"][i + 1]
        # 1. Sample: one policy forward at the shared latents, k candidates each from one mean.
        with ctx["autocast"]():
            v = velocity(transformer, x.to(dtype), 1000 * sigma, embeds, pooled, guidance).float()  # (B, C, h, w)
        eps = per_prompt_randn(generators, per_prompt * k, x.shape[1:], device)  # (B * k, C, h, w)
        candidates = sde_candidates(v, x, sigma, sigma_next, args.noise_level, eps)  # (B * k, C, h, w)
        logp, _, _ = candidate_log_probs(v, x, sigma, sigma_next, args.noise_level, candidates, k)  # (B * k,)
        records.append(dict(x=x, sigma=sigma, sigma_next=sigma_next, x_next=candidates, logp=logp, k=k))
        if not step_mode:
            x = candidates
            continue
        # 2. Score all k candidates at their timestep; 3. local advantages within the k.
        rewards = rewards_of(candidates, 1000 * sigma_next, [q for q in prompts for _ in range(k)],
                             r_pos.repeat_interleave(k, 0), r_pooled.repeat_interleave(k, 0), ctx).view(b, k)
        adv = clip_advantages(normalise_in_groups(rewards, args.adv_eps), args.adv_clip)  # (B, k)
        records[-1]["adv"] = adv.flatten()  # (B * k,)
        if args.continue_from == "best":
            choice = rewards.argmax(1)
        else:
            choice = torch.cat([torch.randint(0, k, (1,), generator=g, device=device) for g in generators])
        x = candidates.view(b, k, *x.shape[1:])[rows, choice]  # (B, C, h, w)
        log["reward"], log["reward_chosen"] = float(rewards.mean()), float(rewards[rows, choice].mean())  # last wins
    if not step_mode:
        # 2. Terminal reward of each trajectory; 3. advantages (Flow-GRPO: the std of every rank's rewards), the
        # same at every step.
        rewards = rewards_of(x, 0.0, [q for q in prompts for _ in range(per_prompt)], r_pos.repeat_interleave(
            per_prompt, 0), r_pooled.repeat_interleave(per_prompt, 0), ctx).view(p, per_prompt)  # (P, G)
        if args.adv_std == "global":
            adv = normalise_by_global_std(rewards, gather_all(rewards, ctx["world"]), args.adv_eps)
        else:
            adv = normalise_in_groups(rewards, args.adv_eps)
        adv = clip_advantages(adv, args.adv_clip).flatten()  # (P * G,)
        for record in records:
            record["adv"] = adv
        log["reward"] = log["reward_chosen"] = float(rewards.mean())
    return records, (embeds, pooled), log


def gather_all(values, world):
    """Every rank's `values` (same shape on each), concatenated along dim 0: (world * P, ...)."""
    if world == 1:
        return values
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values.contiguous())
    return torch.cat(gathered)


def policy_loss(model, record, embeds, pooled, ctx):
    """PPO-clip loss of one recorded step (+ beta * Flow-GRPO's KL to the LoRA-off policy): ONE policy forward at
    the shared latents gives the mean of all k candidates' log-probs. With CFG the unconditional branch is
    detached, as in Flow-GRPO's loss: the gradient flows through the conditional velocity only."""
    args, dtype = ctx["args"], ctx["dtype"]
    guidance = args.guidance if args.cfg_in_loss else 1.0
    x, sigma, sigma_next, k = record["x"], record["sigma"], record["sigma_next"], record["k"]
    with ctx["autocast"]():
        v = velocity(model, x.to(dtype), 1000 * sigma, embeds, pooled, guidance, detach_uncond=True).float()
    logp, mean, _ = candidate_log_probs(v, x, sigma, sigma_next, args.noise_level, record["x_next"], k)
    loss, ratio_dev, clip_frac = ppo_clip_loss(logp, record["logp"], record["adv"], args.clip_eps)
    kl = torch.zeros((), device=x.device)
    if args.kl_beta > 0:
        with torch.no_grad(), base_weights(ctx["transformer"]), ctx["autocast"]():
            v_ref = velocity(ctx["transformer"], x.to(dtype), 1000 * sigma, embeds, pooled, guidance).float()
        _, mean_ref, _ = candidate_log_probs(v_ref, x, sigma, sigma_next, args.noise_level, record["x_next"], k)
        kl = flow_grpo_kl(mean, mean_ref, sigma, sigma_next, args.noise_level)
        loss = loss + args.kl_beta * kl
    return loss, dict(ratio_dev=ratio_dev, clip_frac=clip_frac, kl=kl.detach())


def accumulate_gradients(model, records, embeds, pooled, ctx):
    """Backward of the update's loss: the mean over the first int(T * --timestep-fraction) recorded steps of each
    step's policy_loss (Flow-GRPO trains 9 of 10). DDP all-reduces the gradients once, on the last of them.
    Returns the loss terms averaged over those steps."""
    trained = records[:int(len(records) * ctx["args"].timestep_fraction)]
    stats = dict(loss=0.0, ratio_dev=0.0, clip_frac=0.0, kl=0.0)
    for i, record in enumerate(trained):
        last = i == len(trained) - 1
        with model.no_sync() if ctx["world"] > 1 and not last else contextlib.nullcontext():
            loss, extra = policy_loss(model, record, embeds, pooled, ctx)
            (loss / len(trained)).backward()
        stats["loss"] += loss.item() / len(trained)
        for name, value in extra.items():
            stats[name] += float(value) / len(trained)
    return stats


@torch.no_grad()
def evaluate(prompts, ctx, rank, world, step):
    """Deterministic (ODE) samples of the held-out prompts, scored by the DRM (t = 0) and, on toy prompts, the
    oracle. The same seeds every time, so evaluations along training are comparable. Rank 0 writes up to 8
    samples of its first batch, evenly spaced in it (captioned with their scores), to OUT/samples/step_STEP.png:
    the same prompts and noise at every evaluation, so the PNGs of a run show what training changed."""
    from step_sample import save_grid, step_sample
    args, pipe = ctx["args"], ctx["pipe"]
    mine = prompts[rank::world]
    sums = torch.zeros(3, device=ctx["device"])  # drm, oracle, count
    for start in range(0, len(mine), args.eval_batch_size):
        batch = mine[start:start + args.eval_batch_size]
        with ctx["autocast"]():
            seeds = [args.seed + 7 * (rank + world * (start + j)) for j in range(len(batch))]  # by global index
            _, _, latents = step_sample(pipe, None, batch, seeds,
                                        k=1, steps=args.eval_steps, guidance=args.guidance if args.cfg_in_loss
                                        else 1.0, noise_level=0.0, height=ctx["height"], width=ctx["width"],
                                        max_sequence_length=ctx["length"], return_latents=True)
        latents = latents.float()
        drm = oracle = [None] * len(batch)
        if ctx["drm"] is not None:
            drm = drm_scores(latents, 0.0, *ctx["encode_for_drm"](batch), ctx)
            sums[0] += drm.sum()
        if ctx["toy"]:
            oracle = oracle_scores(pipe.vae, latents, batch)
            sums[1] += oracle.sum()
        sums[2] += len(batch)
        if rank == 0 and start == 0:
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            shown = slice(None, None, max(1, len(batch) // 8))  # spread: the toy list runs from one object to two
            save_grid([list(zip(decode_latents(pipe.vae, latents[shown][:8]), drm[shown][:8], oracle[shown][:8]))],
                      os.path.join(args.out, "samples", f"step_{step:06d}.png"))  # captions: DRM, oracle
    if world > 1:
        dist.all_reduce(sums)
    row = dict(eval_prompts=int(sums[2]))
    if ctx["drm"] is not None:
        row["eval_drm"] = round(float(sums[0] / sums[2]), 5)
    if ctx["toy"]:
        row["eval_oracle"] = round(float(sums[1] / sums[2]), 5)
    return row


# ----------------------------------------------------------------------------------------------------------------
# EMA, prompt sharding, input checks

@torch.no_grad()
def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in place, tensor by tensor."""
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


@contextlib.contextmanager
def swapped_in(params, values):
    """Within the block the parameters hold `values` (e.g. the EMA weights); afterwards their own again."""
    if values is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def shard_prompts(step, rank, world, prompts, per_step, seed):
    """This rank's prompts of one step: a fresh permutation each epoch, contiguous per rank, so a prompt's group
    never spans ranks. The position is the step itself: resuming needs no sampler state."""
    per_rank, chosen = per_step // world, []
    for position in range(step * per_step + rank * per_rank, step * per_step + (rank + 1) * per_rank):
        epoch, offset = divmod(position, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        chosen.append(prompts[int(order[offset])])
    return chosen


def check_args(args, world):
    for name, allowed in CHOICES.items():  # argparse checks them too; Args built in code are checked here
        if getattr(args, name) not in allowed:
            flag = "continue" if name == "continue_from" else name
            raise UserError(f"--{flag} {getattr(args, name)}: choose one of {', '.join(allowed)}")
    if args.reward == "drm" and not args.drm:
        raise UserError("--drm is required with --reward drm (or use --reward oracle on the toy world)")
    if args.mode == "step" and args.k < 2:
        raise UserError(f"--k {args.k}: step mode needs >= 2 candidates per step to compare")
    if args.mode == "grpo" and args.group < 2:
        raise UserError(f"--group {args.group}: grpo mode needs >= 2 trajectories per prompt to compare")
    if args.guidance < 1:
        raise UserError(f"--guidance {args.guidance}: must be >= 1 (1: no classifier-free guidance)")
    if not args.noise_level > 0:
        raise UserError(f"--noise-level {args.noise_level}: must be > 0 (the policy's log-probs need SDE noise)")
    if not 0 <= args.ema < 1:
        raise UserError(f"--ema {args.ema}: the EMA decay must lie in [0, 1) (0: off; Flow-GRPO's is 0.9)")
    if not 0 < args.timestep_fraction <= 1 or int(args.steps * args.timestep_fraction) < 1:
        raise UserError(f"--timestep-fraction {args.timestep_fraction}: must lie in (0, 1] and leave int(--steps * "
                        f"fraction) >= 1 trained steps (--steps {args.steps})")
    if args.adv_clip < 0 or args.kl_beta < 0:
        raise UserError(f"--adv-clip {args.adv_clip} / --kl-beta {args.kl_beta}: must be >= 0 (0: off)")
    if args.lora_rank <= 0 or args.lora_alpha <= 0:
        raise UserError(f"--lora-rank {args.lora_rank} / --lora-alpha {args.lora_alpha} must be > 0")
    for name in ("steps", "eval_steps", "eval_batch_size", "inner_epochs", "save_every", "max_steps",
                 "prompts_per_step", "ema_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} ranks")
    if args.resume and args.resume != "latest" and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint file")


def load_prompt_sets(args, world):
    from toy.world import split_prompts
    train, held_out = split_prompts() if not (args.prompts and args.eval_prompts) else (None, None)
    prompts = read_prompts(args.prompts) if args.prompts else train
    eval_prompts = read_prompts(args.eval_prompts) if args.eval_prompts else held_out
    if world > len(prompts):
        raise UserError(f"{world} ranks but only {len(prompts)} training prompts: use fewer ranks or more prompts")
    return prompts, eval_prompts[:args.eval_num or None]


def is_toy(prompts):
    from toy.world import parse_prompt
    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------

def main(args):
    rank, world, device = setup_distributed()
    check_args(args, world)
    prompts, eval_prompts = load_prompt_sets(args, world)
    if args.reward == "oracle" and not is_toy(prompts):
        raise UserError("--reward oracle scores toy-world prompts only: give toy prompts (or none: the default)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # not one T5 truncation warning per batch of "" prompts
    torch.manual_seed(args.seed + rank)
    os.makedirs(args.out, exist_ok=True)

    # Model: the DRM first (frozen mode freezes the transformer), then the policy's LoRA on the same transformer.
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    transformer = pipe.transformer
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if part is not None:
            part.requires_grad_(False)
    drm, config = load_drm(args.drm, transformer, None if args.drm_skip_last_blocks < 0 else
                           args.drm_skip_last_blocks) if args.drm else (None, {})
    length = args.max_sequence_length or default_sequence_length(pipe, cap=128)  # the policy's T5 length
    drm_length = config.get("max_sequence_length", length)  # the DRM reads the length it was trained with
    multiple = pipe.vae_scale_factor * transformer.config.patch_size
    default_size = min(512, pipe.default_sample_size * pipe.vae_scale_factor)  # Flow-GRPO trains at 512 px
    height, width = args.height or default_size, args.width or default_size
    if height % multiple or width % multiple:
        raise UserError(f"--height {height} / --width {width} must be divisible by {multiple} for {args.model}")
    trainable = add_lora(transformer, args.lora_rank, args.lora_alpha, second_attention=args.lora_attn2)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    print0(f"policy LoRA r={args.lora_rank} alpha={args.lora_alpha}: {sum(p.numel() for p in trainable) / 1e6:.2f}M "
           f"trained parameters; mode {args.mode}, reward {args.reward}, {dtype}, {world} rank(s)", rank=rank)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    ema = [p.detach().clone() for p in trainable] if args.ema > 0 else None
    model = torch.nn.parallel.DistributedDataParallel(
        transformer, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else transformer
    pipe.scheduler.set_timesteps(args.steps, device=device)

    def encode(batch):  # -> positive, negative, positive pooled, negative pooled (negatives only with CFG)
        return pipe.encode_prompt(prompt=list(batch), prompt_2=None, prompt_3=None, device=device,
                                  do_classifier_free_guidance=args.cfg_in_loss, max_sequence_length=length)

    def encode_for_drm(batch):  # -> positive, positive pooled at the DRM's own T5 length
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(batch), prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=drm_length)
        return embeds, pooled

    # The training schedule, kept apart: evaluation re-sets the pipeline's scheduler to --eval-steps.
    ctx = dict(args=args, pipe=pipe, transformer=transformer, drm=drm, dtype=dtype, device=device, encode=encode,
               encode_for_drm=encode_for_drm, drm_length=drm_length, world=world,
               sigmas=pipe.scheduler.sigmas.float().clone().to(device), height=height, width=width, length=length,
               latent_shape=(transformer.config.in_channels, height // pipe.vae_scale_factor,
                             width // pipe.vae_scale_factor), toy=is_toy(eval_prompts),
               autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))

    # Resume: LoRA, optimizer, step (= data position and noise seeds), every rank's torch RNG state.
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    start_step, checkpoint_path = 0, os.path.join(args.out, "checkpoint.pt")
    device_seconds, train_seconds = 0.0, 0.0  # training seconds of all ranks; of this rank (--max-minutes)
    resume_path = checkpoint_path if args.resume == "latest" else args.resume
    if resume_path and os.path.isfile(resume_path):
        checkpoint = torch.load(resume_path, map_location=device, weights_only=False)
        for name, older in (("mode", None), ("lora_rank", None), ("lora_alpha", None), ("cfg_in_loss", None),
                            ("lora_attn2", True)):  # older: what a checkpoint without the field was made with
            saved = checkpoint["args"].get(name, older)
            if saved != getattr(args, name):
                flag = name.replace("_", "-")
                raise UserError(f"--resume {resume_path}: the checkpoint was made with --{flag} {saved}, this run "
                                f"has {getattr(args, name)}")
        set_peft_model_state_dict(transformer, checkpoint["lora"])
        if ema is not None:
            if checkpoint.get("ema") is None:
                raise UserError(f"--resume {resume_path}: the checkpoint has no EMA weights; resume without --ema")
            for e, v in zip(ema, checkpoint["ema"]):
                e.copy_(v)
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step = checkpoint["step"]
        device_seconds = checkpoint.get("device_seconds", 0.0)
        train_seconds = checkpoint.get("train_seconds", checkpoint.get("elapsed", 0.0))  # older ones: wall time
        if len(checkpoint["rng"]) == world:
            torch.set_rng_state(checkpoint["rng"][rank]["torch"].cpu())  # map_location moved it to the device
        else:  # the noise is seeded by step and prompt position: only the global torch RNG is reseeded
            print0(f"resume: {len(checkpoint['rng'])} ranks saved RNG states, {world} now: reseeding", rank=rank)
        print0(f"resumed from {resume_path} at step {start_step}", rank=rank)
    elif args.resume == "latest":
        print0(f"--resume latest: no {checkpoint_path} yet, starting fresh", rank=rank)
    if rank == 0:  # a resumed run logs again from its checkpoint on, a fresh one from the start: drop the rest
        truncate_metrics(os.path.join(args.out, "metrics.jsonl"), start_step if start_step else -1)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    history = [r for r in read_metrics(os.path.join(args.out, "metrics.jsonl")) if "eval_prompts" in r] \
        if rank == 0 and start_step else []  # earlier evaluations of a resumed run, for the plot

    def checkpoint_now(step):
        states = [dict(torch=torch.get_rng_state())]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if rank == 0:
            lora = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
            checkpoint = dict(lora=lora, optimizer=optimizer.state_dict(), step=step, rng=states, args=asdict(args),
                              device_seconds=device_seconds, train_seconds=train_seconds,
                              ema=[e.cpu() for e in ema] if ema is not None else None)
            torch.save(checkpoint, checkpoint_path + ".tmp")
            os.replace(checkpoint_path + ".tmp", checkpoint_path)
            with swapped_in(trainable, ema):  # the LoRA users load: the EMA weights when there are any
                save_lora(transformer, os.path.join(args.out, "lora"))

    stop = {"requested": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))  # preemption: checkpoint, exit
    if eval_prompts and start_step == 0:  # step 0: the base model (the LoRA starts at zero), where curves begin
        row = dict(step=0, device_seconds=0.0, **evaluate(eval_prompts, ctx, rank, world, step=0))
        print0(f"step 0 (base model) eval: {({k: v for k, v in row.items() if k.startswith('eval')})}", rank=rank)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            history.append(row)
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        batch = shard_prompts(step, rank, world, prompts, args.prompts_per_step, args.seed)
        # 1-3. Sample with the current policy, score, advantages (per step, or terminal broadcast to all steps).
        generators = prompt_generators(args.seed, step, rank * len(batch), len(batch), device)
        records, (embeds, pooled), log = rollout(batch, ctx, generators)
        # 4. Update: PPO-clip over the first int(T * fraction) recorded steps, one optimizer step per inner epoch.
        for epoch in range(args.inner_epochs):
            stats = accumulate_gradients(model, records, embeds, pooled, ctx)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            optimizer.step()
            optimizer_steps = step * args.inner_epochs + epoch + 1
            if ema is not None and (optimizer_steps + 1) % args.ema_every == 0:  # Flow-GRPO's schedule
                ema_update(ema, trainable, ema_decay(optimizer_steps, args.ema))
            optimizer.zero_grad(set_to_none=True)
            if epoch == 0:  # logged: the on-policy check needs the first epoch's ratio (it must be 1)
                first = stats

        # 5. Log, evaluate, checkpoint.
        done = step + 1
        # reward: mean over the last step's candidates (step mode: clean latents) or the terminal rewards (grpo).
        totals = torch.tensor([log["reward"], log["reward_chosen"], first["loss"], first["kl"], first["ratio_dev"],
                               first["clip_frac"], stats["ratio_dev"]], device=device)  # stats: the last epoch's
        if world > 1:
            dist.all_reduce(totals)
            totals /= world
        seconds = time.time() - t0
        device_seconds += seconds * world
        train_seconds += seconds  # --max-minutes counts the time before a resume too
        row = dict(step=done, reward=totals[0].item(), reward_chosen=totals[1].item(), loss=totals[2].item(),
                   kl=totals[3].item(), ratio_dev=totals[4].item(), clip_frac=totals[5].item(),
                   grad_norm=float(grad_norm), seconds=round(seconds, 3), device_seconds=round(device_seconds, 2))
        if args.inner_epochs > 1:  # later epochs are off-policy: their ratio moves away from 1
            row["ratio_dev_last_epoch"] = totals[6].item()
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        out_of_time = rank0_says(args.max_minutes > 0 and train_seconds > 60 * args.max_minutes, world,
                                 device)  # rank 0's clock decides, so that every rank stops at the same step
        last = done == args.max_steps or out_of_time
        evaluated = eval_prompts and (last or (args.eval_every and done % args.eval_every == 0))
        if evaluated:
            with swapped_in(trainable, ema):
                row.update(evaluate(eval_prompts, ctx, rank, world, step=done))
            print0(f"step {done} eval: {({k: v for k, v in row.items() if k.startswith('eval')})}", rank=rank)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if evaluated:
                history.append(row)
                plot_runs([(f"{args.mode} (reward {args.reward})", history)], "eval_oracle" if ctx["toy"]
                          else "eval_drm", os.path.join(args.out, "reward.png"))
            bar.set_postfix(reward=round(row["reward"], 4), ratio_dev=f"{row['ratio_dev']:.1e}")
        stop["requested"] = any_rank_says(stop["requested"], world, device)
        if last or done % args.save_every == 0 or stop["requested"]:
            checkpoint_now(done)
        if stop["requested"]:
            print0(f"SIGTERM: checkpoint written at step {done}, exiting", rank=rank)
            break
        if out_of_time:
            print0(f"--max-minutes {args.max_minutes}: stopped at step {done} of {args.max_steps}", rank=rank)
            break
    bar.close()
    signal.signal(signal.SIGTERM, previous)  # the caller's handler again (main called in-process: tests)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
