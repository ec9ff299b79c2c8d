"""The DRM (PAPER.md section 1): a reward head over a frozen prefix of the SD3.5 transformer, plus the shared
parts every stage needs: loading an SD3 pipeline folder, prompt and image encoding, Flow-GRPO's SDE step, and
the policy's LoRA (added with peft, saved in diffusers' format).

The DRM runs the first N - m blocks of `SD3Transformer2DModel`, then the transformer's norm_out and proj_out,
unpatchifies to a (B, 16, h, w) map and applies the ConvGN head `reward_output`. Its state_dict follows the
authors' layout (`transformer.*` at full depth + `reward_output.*`), so their `model.safetensors` loads strictly.

Backbone modes:
- frozen: the prefix IS the generator's transformer (same module, one copy in memory); trained: the head and,
  with `train_output_layers`, private copies of norm_out / proj_out (the generator's own never change).
- lora:   a peft adapter named "drm" on the prefix's attention projections of a private transformer copy.
- full:   a private transformer copy, all of it trained (the authors' recipe).
"""
import copy
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from data import UserError

PIPELINE_PARTS = ("scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3", "transformer", "vae")
BACKBONE_MODES = ("frozen", "lora", "full")
SMALL_WIDTH = 512  # transformers narrower than this (the toy and test pipelines) sample in fp32 on a GPU too
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# ----------------------------------------------------------------------------------------------------------------
# Pipeline loading and encoding

def load_pipeline(path, dtype=torch.float32, device="cpu"):
    """Every part of an SD3/SD3.5 pipeline from a local diffusers folder (or a hub id where a network exists)."""
    import diffusers
    import transformers
    from diffusers import StableDiffusion3Pipeline
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise UserError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        with open(index) as f:
            parts = json.load(f)
        for part in PIPELINE_PARTS:
            if part not in parts or not os.path.isdir(os.path.join(path, part)):
                raise UserError(f"{path}: SD3 pipeline part '{part}' is missing (expected folder {path}/{part})")
    elif os.path.exists(path) or path.count("/") != 1:
        raise UserError(f"{path}: no such pipeline folder (give a local SD3/SD3.5 diffusers folder)")
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def inference_dtype(path, device):
    """The dtype to sample a pipeline folder in: bf16 on a GPU, fp32 on the CPU, and fp32 anywhere for a transformer
    narrower than SMALL_WIDTH, where bf16 saves nothing: the toy pipeline sampled in bf16 on a GPU scored 0.53 on
    the oracle, in fp32 on the CPU 0.70, the same 256 jobs (docs/toy/README.md, round 6)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    config = os.path.join(path, "transformer", "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            c = json.load(f)
        if c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0) < SMALL_WIDTH:
            return torch.float32
    return torch.bfloat16


def default_sequence_length(pipe, cap=256):
    """The T5 length to encode the generator's prompts with when nothing says otherwise: `cap` (diffusers' pipeline
    default 256; Flow-GRPO trains with 128), or less when the T5 tokenizer's model_max_length is less (the toy
    pipeline records its training length, 16, there: the length changes the embeddings, so a pipeline must be
    sampled with the length it learnt)."""
    tokenizer = getattr(pipe, "tokenizer_3", None)
    return min(cap, tokenizer.model_max_length) if tokenizer is not None else cap


@torch.no_grad()
def encode_prompts(pipe, prompts, max_sequence_length=256):
    """SD3 prompt embeddings: CLIP-L + CLIP-G penultimate states zero-padded to the T5 width, then T5 tokens.
    Returns prompt_embeds (B, 77 + L, 4096) and pooled_prompt_embeds (B, 2048) (both CLIP pooled outputs)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe.transformer.device,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return embeds, pooled


def encode_prompts_cached(pipe, prompts, max_sequence_length, cache, size):
    """encode_prompts with each distinct prompt encoded once per batch, and the embeddings of the first `size`
    distinct prompts seen kept in `cache` (a dict): a data set of few prompts (the toy world's 961) runs the text
    encoders only on first sight (reward_train.py --prompt-cache). size 0: nothing kept."""
    new = [p for p in dict.fromkeys(prompts) if p not in cache]
    fresh = {}
    if new:
        embeds, pooled = encode_prompts(pipe, new, max_sequence_length)
        fresh = {p: (e, q) for p, e, q in zip(new, embeds, pooled)}
        for p in new[:max(0, size - len(cache))]:
            cache[p] = (fresh[p][0].clone(), fresh[p][1].clone())  # not views of the batch's tensors
    pick = [cache[p] if p in cache else fresh[p] for p in prompts]
    return torch.stack([e for e, _ in pick]), torch.stack([q for _, q in pick])


@torch.no_grad()
def encode_images(vae, pixels):
    """Pixels in [-1, 1] (B, 3, H, W) -> SD3 latents x0. The VAE mean, not a sample: same image, same latent."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents):
    """SD3 latents -> pixels in [-1, 1] (B, 3, H, W)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents).sample.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Flow-GRPO's SDE step (PAPER.md section 2), shared by step_grpo.py and step_sample.py

def sde_step(v, x, sigma, sigma_next, noise_level, x_next=None, generator=None):
    """One reverse step from sigma to sigma_next (< sigma) of the SDE whose marginals match the flow ODE.

    v, x: (B, C, H, W) velocity and current latent; sigma, sigma_next: floats or tensors broadcastable to x.
    Draws x_next when it is None, else scores the given x_next. Returns (x_next, log_prob (B,), mean, std), all
    float32. noise_level 0 is the Euler ODE step: x_next = mean, and log_prob is zero (no density to report)."""
    v, x = v.float(), x.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    dt = sigma_next - sigma  # < 0
    # sigma / (1 - sigma) is infinite at sigma = 1: there the next sigma takes the denominator's place.
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = (std_t * torch.sqrt(-dt)).expand_as(mean)
    if x_next is None:
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                          device=generator.device if generator is not None else x.device).to(x.device)
        x_next = mean + std * eps
    x_next = x_next.float()
    if noise_level == 0:
        return x_next, torch.zeros(x.shape[0], device=x.device), mean, std
    log_prob = -((x_next - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return x_next, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


# ----------------------------------------------------------------------------------------------------------------
# The reward model

class RewardHead(nn.Module):
    """The authors' "ConvGN" head: three stride-2 conv + GroupNorm + ReLU stages, global pool, MLP to a scalar."""

    def __init__(self, in_channels=16):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(in_channels, 256, 3, 2, 1), nn.GroupNorm(32, 256), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(256, 512, 3, 2, 1), nn.GroupNorm(32, 512), nn.ReLU())
        self.down3 = nn.Sequential(nn.Conv2d(512, 512, 3, 2, 1), nn.GroupNorm(32, 512), nn.ReLU())
        self.mlp = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, 1))

    def forward(self, features):  # (B, 16, h, w) -> (B,)
        pooled = F.adaptive_avg_pool2d(self.down3(self.down2(self.down1(features))), 1).flatten(1)  # (B, 512)
        return self.mlp(pooled).squeeze(-1)


def unpatchify(tokens, patch_size, height, width):
    """(B, h/p * w/p, p * p * C) tokens -> (B, C, h, w) map, the transformer's own unpatchify."""
    b, p = tokens.shape[0], patch_size
    tokens = tokens.reshape(b, height // p, width // p, p, p, -1)  # (B, h/p, w/p, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", tokens).reshape(b, -1, height, width)


class DRM(nn.Module):
    def __init__(self, transformer, skip_last_blocks=3, mode="frozen", train_output_layers=False,
                 lora_rank=32, lora_alpha=64):
        super().__init__()
        if mode not in BACKBONE_MODES:
            raise UserError(f"DRM backbone mode '{mode}' is not one of {BACKBONE_MODES}")
        num_blocks = len(transformer.transformer_blocks)
        if not 0 <= skip_last_blocks < num_blocks:
            raise UserError(f"skip_last_blocks={skip_last_blocks} must lie in [0, {num_blocks - 1}] "
                            f"for a transformer of {num_blocks} blocks")
        self.transformer = transformer
        self.prefix_blocks = num_blocks - skip_last_blocks
        # Only frozen mode has private output layers; full trains the transformer's own, lora leaves them.
        self.mode, self.train_output_layers = mode, train_output_layers and mode == "frozen"
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.gradient_checkpointing = False
        if mode == "frozen":
            transformer.requires_grad_(False)
            if self.train_output_layers:  # private copies: the generator's own norm_out / proj_out never change
                self.norm_out = copy.deepcopy(transformer.norm_out).requires_grad_(True)
                self.proj_out = copy.deepcopy(transformer.proj_out).requires_grad_(True)
        elif mode == "lora":
            from peft import LoraConfig
            transformer.requires_grad_(False)
            prefix = "|".join(str(i) for i in range(self.prefix_blocks))
            targets = "|".join(t.replace(".", r"\.") for t in LORA_TARGETS)
            transformer.add_adapter(LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                target_modules=rf".*transformer_blocks\.({prefix})\.attn2?\.({targets})"), adapter_name="drm")
            transformer.set_adapter("drm")
        else:
            transformer.requires_grad_(True)
        self.reward_output = RewardHead(transformer.config.out_channels)
        # Parameters that cannot reach the score must not train (DDP requires every trainable one to get a grad):
        # the skipped blocks, and the context-output path of the last prefix block (its context stream is unused;
        # its context queries only feed that stream, so they would get zero gradients and only decay).
        last = transformer.transformer_blocks[self.prefix_blocks - 1]
        for module in [*transformer.transformer_blocks[self.prefix_blocks:], last.attn.to_add_out, last.ff_context,
                       last.attn.add_q_proj, last.attn.norm_added_q]:
            if module is not None:
                module.requires_grad_(False)

    def config_dict(self):
        return dict(skip_last_blocks=len(self.transformer.transformer_blocks) - self.prefix_blocks, mode=self.mode,
                    train_output_layers=self.train_output_layers, lora_rank=self.lora_rank,
                    lora_alpha=self.lora_alpha)

    def prefix(self, latents, timestep, prompt_embeds, pooled_prompt_embeds, return_context=False):
        """Run the first N - m blocks. Returns the image tokens (B, h/p * w/p, D) and the timestep embedding (and,
        with return_context, the text tokens, so a sampler can finish the generator's forward from here)."""
        tr = self.transformer
        timestep = torch.as_tensor(timestep, device=latents.device).float().expand(latents.shape[0])
        hidden = tr.pos_embed(latents).contiguous()  # (B, tokens, D)
        temb = tr.time_text_embed(timestep, pooled_prompt_embeds)  # (B, D)
        context = tr.context_embedder(prompt_embeds)  # (B, text tokens, D)
        for block in tr.transformer_blocks[:self.prefix_blocks]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, hidden = torch.utils.checkpoint.checkpoint(block, hidden, context, temb, use_reentrant=False)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        return (hidden, temb, context) if return_context else (hidden, temb)

    def score_prefix(self, hidden, temb, height, width):
        """Prefix activations -> score: norm_out, proj_out, unpatchify to (B, 16, h, w), ConvGN head."""
        norm_out = self.norm_out if self.train_output_layers else self.transformer.norm_out
        proj_out = self.proj_out if self.train_output_layers else self.transformer.proj_out
        dtype = proj_out.weight.dtype  # private copies may train in float32 over a bf16 backbone
        tokens = proj_out(norm_out(hidden.to(dtype), temb.to(dtype)))  # (B, tokens, p * p * 16)
        features = unpatchify(tokens, self.transformer.config.patch_size, height, width)  # (B, 16, h, w)
        return self.reward_output(features.to(self.reward_output.mlp[0].weight.dtype)).float()

    def forward(self, latents, timestep, prompt_embeds, pooled_prompt_embeds):
        """Score (B,) float32 of (noisy) latents at `timestep` = 1000 * sigma (0 for clean images)."""
        hidden, temb = self.prefix(latents, timestep, prompt_embeds, pooled_prompt_embeds)
        return self.score_prefix(hidden, temb, *latents.shape[-2:])

    def trainable_state_dict(self):
        """What training changes: all a checkpoint of this mode needs on top of the base transformer."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}


def compile_blocks(transformer, mode=None):
    """torch.compile every transformer block in place. The generator's forward, the DRM prefix and the sampler's
    suffix all call the blocks, so all three run compiled; each new input shape (the CFG pair, k candidates)
    compiles once, on first use."""
    import torch._dynamo
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))  # blocks x shapes, more than the default 8
    for block in transformer.transformer_blocks:
        block.compile(mode=mode)
    return transformer


def transformer_suffix(transformer, hidden, context, temb, first_block, height, width):
    """Finish the transformer's forward from block `first_block` on: the velocity (B, C, height, width) that
    `transformer(...)` returns, given the image tokens, text tokens and timestep embedding after the blocks before."""
    for block in transformer.transformer_blocks[first_block:]:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    tokens = transformer.proj_out(transformer.norm_out(hidden, temb))
    return unpatchify(tokens, transformer.config.patch_size, height, width)


def score_images(drm, vae, pixels, prompt_embeds, pooled_prompt_embeds):
    """Clean-image score: VAE mean latent at timestep 0, so the same image always gets the same score."""
    latents = encode_images(vae, pixels).to(prompt_embeds.dtype)
    return drm(latents, torch.zeros(len(latents), device=latents.device), prompt_embeds, pooled_prompt_embeds)


# ----------------------------------------------------------------------------------------------------------------
# The policy's LoRA (step_grpo.py)

def add_lora(transformer, rank, alpha, second_attention=False):
    """Flow-GRPO's LoRA: r=32, alpha=64, gaussian init, on the projections of the first attention `attn` (both
    streams); second_attention=True also adapts `attn2` of SD3.5's dual-attention blocks."""
    from peft import LoraConfig
    # The last block's context queries only feed its discarded context output: no gradient could reach them
    # (and DDP requires every trained parameter to get one).
    # A regex (peft full-matches it), not exclude_modules: diffusers' loader would warn that nothing was excluded.
    last = len(transformer.transformer_blocks) - 1
    targets = "|".join(t.replace(".", r"\.") for t in LORA_TARGETS)
    attention = "attn2?" if second_attention else "attn"
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=(
        rf"(?!transformer_blocks\.{last}\.attn\.add_q_proj$).*\.{attention}\.({targets})")))
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.float()  # trained in fp32 over a bf16 base
    return [p for p in transformer.parameters() if p.requires_grad]


def save_lora(transformer, out_dir):
    """diffusers' own layout; the peft config travels as metadata so load_lora_weights gets alpha right."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    tmp = out_dir + ".tmp"
    StableDiffusion3Pipeline.save_lora_weights(
        tmp, transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: ours (trained parameters + config in safetensors metadata) and the authors' (full state dict)

def transformer_architecture(transformer):
    """The transformer's config as JSON values: a DRM fits only the architecture it was trained over."""
    return json.loads(json.dumps({k: v for k, v in transformer.config.items() if not k.startswith("_")}))


def save_drm(drm, path, base_model="", max_sequence_length=512):
    """Write the trained parameters and the DRM config (base, m, T5 length, mode) to one safetensors file."""
    config = dict(drm.config_dict(), base_model=str(base_model), max_sequence_length=max_sequence_length,
                  transformer_config=transformer_architecture(drm.transformer))
    tensors = {k: v.contiguous().cpu() for k, v in drm.trainable_state_dict().items()}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"drm_config": json.dumps(config)})
    os.replace(tmp, path)


def read_drm_config(path):
    """Our config from the file's metadata, or None for the authors' layout (a bare state dict)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["drm_config"]) if "drm_config" in meta else None


AUTHORS_HEADS = {24: 3, 38: 5}  # transformer depth -> m of the authors' heads: "2BConvGN" (Medium), "7BConvGN" (Large)
AUTHORS_SEQUENCE_LENGTH = 512  # the T5 length the authors train and score with


def authors_skip_last_blocks(num_blocks, override=None, path="the DRM file"):
    """m for an authors' checkpoint, whose file does not record it: named by the model (24 blocks -> 3, 38 -> 5),
    or the user's --drm-skip-last-blocks."""
    if override is not None:
        return override
    if num_blocks not in AUTHORS_HEADS:
        raise UserError(f"{path}: an authors' DRM file over a {num_blocks}-block transformer, and their head depth is "
                        f"known only for SD3.5-Medium (24 blocks, m=3) and Large (38, m=5): pass "
                        f"--drm-skip-last-blocks M")
    return AUTHORS_HEADS[num_blocks]


def load_drm(path, transformer, skip_last_blocks=None):
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such DRM checkpoint file")
    from safetensors.torch import load_file
    config = read_drm_config(path)
    tensors = load_file(path)
    official = config is None
    if official:  # the authors' layout: full-depth fine-tuned transformer + head
        m = authors_skip_last_blocks(len(transformer.transformer_blocks), skip_last_blocks, path)
        config = dict(skip_last_blocks=m, mode="full", train_output_layers=False, official=True,
                      max_sequence_length=AUTHORS_SEQUENCE_LENGTH)
    elif skip_last_blocks is not None and skip_last_blocks != config["skip_last_blocks"]:
        raise UserError(f"{path}: this DRM was trained with m={config['skip_last_blocks']} (skip_last_blocks); "
                        f"--drm-skip-last-blocks {skip_last_blocks} applies to the authors' files only")
    # A frozen head-only file has no tensor whose shape would betray another base model: compare the configs.
    saved, current = config.get("transformer_config"), transformer_architecture(transformer)
    # Only fields both configs know: another diffusers version may add or drop optional ones.
    changed = ", ".join(f"{k}={saved[k]} (here {current[k]})" for k in sorted(saved.keys() & current.keys())
                        if saved[k] != current[k]) if saved is not None else ""
    if changed:
        raise UserError(f"{path}: the DRM was trained over a transformer with {changed}: load it over that base model")
    own = transformer if config["mode"] == "frozen" else copy.deepcopy(transformer)
    drm = DRM(own, **{k: config[k] for k in ("skip_last_blocks", "mode", "train_output_layers")},
              **{k: config[k] for k in ("lora_rank", "lora_alpha") if k in config})
    expected = drm.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise UserError(f"{path}: tensor '{name}' has no place in a DRM over this base model "
                            f"(a checkpoint of another model or layout?)")
        if expected[name].shape != tensor.shape:
            raise UserError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, this base model needs "
                            f"{tuple(expected[name].shape)}: the DRM was built for another base model")
    # The authors' file holds the whole state dict; ours hold exactly what the mode trains.
    needed = set(expected) if official else set(drm.trainable_state_dict())
    missing = needed - set(tensors)
    if missing:
        raise UserError(f"{path}: {len(missing)} tensors are missing, e.g. '{sorted(missing)[0]}'")
    drm.load_state_dict(tensors, strict=official)
    drm.to(next(transformer.parameters()).device)
    return drm.eval(), config
