"""Tiny SD3.5-style pipelines with random weights, built in code (no downloads), and the real SD3.5 shapes.

The tiny pipeline uses diffusers' and transformers' own classes with small configs and SD3.5's features
(dual attention blocks, rms qk-norm), with character-level tokenizers built in memory. Tests, the demo and the
benchmarks use it; `SD35_MEDIUM` / `SD35_LARGE` are the real transformer configs for random-weight speed runs.
"""
import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5Tokenizer)

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                  dual_attention_layers=(), qk_norm="rms_norm")

TINY_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                        caption_projection_dim=32, pooled_projection_dim=96, pos_embed_max_size=32,
                        dual_attention_layers=(0, 1), qk_norm="rms_norm")
_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def tiny_tokenizers(words=()):
    """Character-level CLIP and T5 tokenizers, built from in-memory vocabularies. `words` become whole-word T5
    pieces (preferred over spelling them out), so a small fixed vocabulary reads as words."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    pieces += [("\u2581" + w, -0.5) for w in words if len(w) > 1]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


def build_tiny_pipeline(seed=0, transformer_config=None):
    """A random-weight StableDiffusion3Pipeline of a few MB with the SD3.5 component layout."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_tokenizers()

    def clip_encoder(width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=width, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))

    # pooled_projection_dim (96) = CLIP-L projection (32) + CLIP-G projection (64), as 768 + 1280 = 2048 in SD3.5.
    text_encoder, text_encoder_2 = clip_encoder(32), clip_encoder(64)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8))
    transformer = SD3Transformer2DModel(**(transformer_config or TINY_TRANSFORMER))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok)


def save_tiny_pipeline(path, seed=0, transformer_config=None):
    """Build the tiny pipeline and save it as a diffusers folder; returns the path."""
    build_tiny_pipeline(seed, transformer_config).save_pretrained(str(path))
    return str(path)
