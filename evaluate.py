"""The paper's evaluation metrics over a folder of samples, from local weights: PickScore, CLIP score, HPSv2, HPSv3,
ImageReward, and our DRM (PAPER.md sections 3-4 report ImageReward, PickScore and HPSv3).

Input: a folder written by step_sample.py (its results.jsonl names each PNG, prompt and seed; `DIR:k=4` keeps the
rows whose field k is 4, so the two methods of a --grid folder are two runs), or any folder of images with
--prompts FILE (one prompt per image, in file-name order). Output: one JSONL file (a row per image with every
metric, then a summary row per run and metric: mean, std, 95% t-interval, n) and a one-screen table. --compare A B
pairs the images of two runs by (prompt, seed) and reports the mean paired difference B - A with its 95% t-interval
(k = 1 vs k = 6 on the same seeds, base vs LoRA).

Each metric loads from its own sub-folder of --weights-dir, through its authors' package or the standard model
classes, and never downloads anything; a missing folder, package or file is a one-line error naming it:
- pickscore/    PickScore (Kirstain et al. 2023): transformers' CLIPModel (the files of yuvalkirstain/PickScore_v1)
                with its processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's files) in pickscore/ or
                pickscore/processor/. Score = logit_scale.exp() * cos(image, text), as the authors' example.
- clip/         CLIP score: a transformers CLIP folder with its processor (e.g. openai/clip-vit-large-patch14).
                Score = 100 * max(cos(image, text), 0), torchmetrics' CLIPScore; Hessel et al.'s CLIP-S is the
                same cosine scaled by 2.5.
- hpsv2/        HPSv2 (Wu et al. 2023) through open_clip (open_clip_torch): the authors' HPS_v2.1_compressed.pt
                (or HPS_v2_compressed.pt) over open_clip's built-in ViT-H-14, or an open_clip folder
                (open_clip_config.json + weights). Score = cos(image, text), as their img_score.py.
- imagereward/  ImageReward (Xu et al. 2023) through its package image-reward: ImageReward.pt, med_config.json and
                tokenizer/ (the files of bert-base-uncased, which the package would otherwise fetch).
- hpsv3/        HPSv3 (Ma et al. 2025) through its package hpsv3: HPSv3.safetensors and Qwen2-VL-7B-Instruct/ (the
                base model its config names). Score = the mean mu of the model's (mu, sigma).
- drm           our DRM (--drm, over the pipeline --model): clean-image score at t = 0 from the VAE mean, as
                step_sample.py scores its final images; the PNG's 8-bit rounding moves it slightly.
Departure: the paper does not say how it scales PickScore (16.76 for the base model); these are the authors' raw
scores, so set differences, not levels, beside its table. image-reward 1.5 and hpsv3 1.0.0 need transformers < 5
(hpsv3 pins 4.45.2); this project needs >= 5, so those two run in an environment of their own
(requirements-evaluate.txt says how). GenEval (an object detector stack) is not here: README.md says what it would
take.

    python evaluate.py runs/samples --metrics pickscore,clip,hpsv2 --weights-dir /models/scorers
    python evaluate.py --compare runs/demo:k=1 runs/demo:k=4 --metrics drm --drm toy/assets/drm.safetensors
    python evaluate.py --compare runs/base runs/lora --metrics pickscore,imagereward,hpsv3 --weights-dir /models/scorers
"""
import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from data import UserError, read_prompts, read_records

TOY_MODEL, TOY_DRM = "toy/assets/pipeline", "toy/assets/drm.safetensors"
METRICS = ("pickscore", "clip", "hpsv2", "imagereward", "hpsv3", "drm")
PAPER_METRICS = "pickscore,imagereward,hpsv3"  # the paper's table (GenEval aside)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
HPSV2_ARCH = "ViT-H-14"  # HPSv2's backbone, an open_clip built-in config
LAYOUT = {  # what each sub-folder of --weights-dir holds
    "pickscore": "yuvalkirstain/PickScore_v1's files, its processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) there "
                 "or in processor/",
    "clip": "a transformers CLIP model with its processor, e.g. openai/clip-vit-large-patch14's files",
    "hpsv2": "HPS_v2.1_compressed.pt (ViT-H-14), or open_clip_config.json with its weights",
    "imagereward": "ImageReward.pt, med_config.json and tokenizer/ (bert-base-uncased's files)",
    "hpsv3": "HPSv3.safetensors and Qwen2-VL-7B-Instruct/",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", help="a sample folder, optionally DIR:FIELD=VALUE[,...] to keep the rows of its "
                                          "results.jsonl whose fields match (e.g. runs/demo:k=4)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two runs (as `run`) on the same prompts and "
                   "seeds: also report the paired difference B - A")
    p.add_argument("--metrics", default=PAPER_METRICS, help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--weights-dir", default="weights", help="one sub-folder per metric: pickscore/, clip/, hpsv2/, "
                   "imagereward/, hpsv3/ (their layouts: the docstring of evaluate.py)")
    p.add_argument("--prompts", default="", help="prompt file (.txt or .jsonl) for a folder without results.jsonl: "
                                                 "one prompt per image, in file-name order")
    p.add_argument("--model", default=TOY_MODEL, help="SD3/SD3.5 diffusers folder the DRM runs over (drm only)")
    p.add_argument("--drm", help=f"DRM checkpoint for the drm metric; None: {TOY_DRM} over the toy pipeline")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward")
    p.add_argument("--device", default="", help="cuda or cpu; empty: cuda when there is one")
    p.add_argument("--skip-unavailable", action="store_true", help="skip a metric that cannot load (one line on "
                                                                   "stderr says why) instead of stopping")
    p.add_argument("--out", default="", help="JSONL output; empty: evaluation.jsonl in the (first) run's folder")
    args = p.parse_args(argv)
    if args.drm is None:  # the toy pipeline comes with its DRM, as in step_sample.py
        args.drm = TOY_DRM if os.path.normpath(args.model) == os.path.normpath(TOY_MODEL) else ""
    return args


# ----------------------------------------------------------------------------------------------------------------
# The statistics: means with 95% t-intervals, and paired differences

# Student's t 0.975 quantiles for 1..30 degrees of freedom; above 30 the Cornish-Fisher series in 1/df below is
# within 2e-6 of the exact quantile, so no scipy.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964


def t_quantile_975(df):
    """The 0.975 quantile of Student's t with df >= 1 degrees of freedom (two-sided 95%)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_interval(values):
    """Mean, sample std and 95% t-interval mean +- t(n-1) * std / sqrt(n); with one value no interval (None)."""
    x = np.asarray(values, dtype=np.float64)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return dict(n=n, mean=mean, std=None, ci95=None)
    std = float(x.std(ddof=1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci95=[mean - half, mean + half])


def paired_difference(a, b):
    """a, b: {key: score} over the same keys -> the t-interval of the differences b - a, and how often b > a. The
    pairing removes the per-prompt level (the DRM's differs by prompt) from the interval, as the same seeds allow."""
    diffs = [b[key] - a[key] for key in a]
    return dict(mean_interval(diffs), b_better=float(np.mean([d > 0 for d in diffs])))


# ----------------------------------------------------------------------------------------------------------------
# Runs: which images, with which prompt, paired by which key

@dataclass(frozen=True)
class Sample:
    file: str
    prompt: str
    seed: int | None  # from results.jsonl; None for a folder with a prompt file
    key: tuple  # (prompt, seed), or (prompt, i-th image of that prompt) without seeds: what pairs two runs


def parse_run_spec(spec):
    """'DIR' or 'DIR:FIELD=VALUE[,FIELD=VALUE]' -> (DIR, {field: value})."""
    folder, _, selection = spec.rpartition(":")
    if not folder or "=" not in selection:
        return spec, {}
    filters = {}
    for item in selection.split(","):
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise UserError(f"{spec}: expected DIR:FIELD=VALUE[,FIELD=VALUE], got '{item}'")
        filters[field] = value
    return folder, filters


def matches(row, filters):
    """A results.jsonl row against FIELD=VALUE strings: 4 matches 4 and "4", null matches null or None."""
    return all(str(row.get(f)) == v or json.dumps(row.get(f)) == v for f, v in filters.items())


def read_run(spec, prompts_file=""):
    """The samples of one run: results.jsonl's rows (selected), or the folder's images with a prompt file."""
    folder, filters = parse_run_spec(spec)
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such sample folder")
    results = os.path.join(folder, "results.jsonl")
    if prompts_file:
        if filters:
            raise UserError(f"{spec}: a selection needs the folder's results.jsonl; drop --prompts or the selection")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        prompts = read_prompts(prompts_file)
        if len(files) != len(prompts):
            raise UserError(f"{folder}: {len(files)} images but {prompts_file} holds {len(prompts)} prompts (one "
                            "prompt per image, in file-name order)")
        seen = {}
        samples = []
        for name, prompt in zip(files, prompts):
            seen[prompt] = seen.get(prompt, -1) + 1
            samples.append(Sample(os.path.join(folder, name), prompt, None, (prompt, seen[prompt])))
        return samples
    if not os.path.isfile(results):
        raise UserError(f"{folder}: no results.jsonl; give --prompts FILE (one prompt per image, in file-name order)")
    rows = read_records(results)
    for field in filters:
        if not any(isinstance(r, dict) and field in r for r in rows):
            raise UserError(f"{results}: no row has the field '{field}' that {spec} selects on")
    samples, seen = [], {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not matches(row, filters):
            continue
        for field in ("prompt", "file"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise UserError(f"{results}: line {index + 1} lacks a non-empty string field '{field}'")
        # The folder may have moved since sampling: its own copy of the file wins over the recorded path.
        path = os.path.join(folder, os.path.basename(row["file"]))
        if not os.path.isfile(path):
            path = row["file"]
        if not os.path.isfile(path):
            raise UserError(f"{results}: line {index + 1}: image {row['file']} not found (nor in {folder})")
        seen[row["prompt"]] = seen.get(row["prompt"], -1) + 1
        seed = row.get("seed")
        samples.append(Sample(path, row["prompt"], seed, (row["prompt"], seed if seed is not None else
                                                          seen[row["prompt"]])))
    if not samples:
        raise UserError(f"{results}: no row matches {spec}")
    return samples


def check_pairable(spec_a, a, spec_b, b):
    """Two runs pair only on the same (prompt, seed) jobs, each once."""
    for spec, samples in ((spec_a, a), (spec_b, b)):
        keys = [s.key for s in samples]
        if len(set(keys)) < len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise UserError(f"{spec}: several images share prompt '{dup[0]}' and seed {dup[1]}: select one method, "
                            f"e.g. {spec}:k=4")
    only_a = {s.key for s in a} - {s.key for s in b}
    only_b = {s.key for s in b} - {s.key for s in a}
    if only_a or only_b:
        example = next(iter(only_a or only_b))
        raise UserError(f"--compare {spec_a} {spec_b}: not the same prompts and seeds ({len(only_a)} jobs only in A, "
                        f"{len(only_b)} only in B, e.g. prompt '{example[0]}' seed {example[1]})")


def load_images(files):
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except OSError as e:
            raise UserError(f"{path}: unreadable image ({e})") from None
    return images


# ----------------------------------------------------------------------------------------------------------------
# The metrics: each loader returns score(images: [PIL], prompts: [str]) -> [float]

def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def import_package(module, metric, package):
    """The metric's package, or a one-line reason why not."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"metric '{metric}' needs the package {package}, not installed here "
                        "(requirements-evaluate.txt)")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception as e:  # a package of its own era fails on newer dependencies: say so, in one line
        raise UserError(f"metric '{metric}': the package {package} does not import here ({type(e).__name__}: "
                        f"{first_line(e)}); see requirements-evaluate.txt") from None


def weights_folder(weights_dir, metric):
    folder = os.path.join(weights_dir, metric)
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder; metric '{metric}' reads its weights there ({LAYOUT[metric]})")
    return folder


def require_file(path, metric):
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; metric '{metric}' needs it ({LAYOUT[metric]})")
    return path


def load_clip(weights_dir, metric, device):
    """A transformers CLIP folder (PickScore's or CLIP's) -> score function: PickScore = logit_scale.exp() * cos,
    CLIP score = 100 * max(cos, 0). The model's forward normalises both embeddings."""
    folder = weights_folder(weights_dir, metric)
    config = require_file(os.path.join(folder, "config.json"), metric)
    with open(config) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "clip":
        raise UserError(f"{config}: model_type '{model_type}', metric '{metric}' needs a CLIP model ('clip')")
    processor_dir = os.path.join(folder, "processor") if os.path.isdir(os.path.join(folder, "processor")) else folder
    require_file(os.path.join(processor_dir, "preprocessor_config.json"), metric)
    import transformers
    # The PIL image processor (transformers 5 names it CLIPImageProcessorPil, 4 CLIPImageProcessor): the one the
    # published numbers were computed with; transformers 5 picks a torchvision one by default where it can.
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    try:
        model = transformers.CLIPModel.from_pretrained(folder).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(processor_dir)
        image_processor = image_processor_class.from_pretrained(processor_dir)
    except Exception as e:  # transformers' own message names what is wrong with the folder
        raise UserError(f"{folder}: metric '{metric}' cannot load it ({first_line(e)})") from None
    max_length = model.config.text_config.max_position_embeddings  # 77: longer prompts are cut, as CLIP was trained

    @torch.no_grad()
    def score(images, prompts):
        text = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                    pixel_values=pixels.to(device))
        cos = (out.image_embeds * out.text_embeds).sum(-1).float()  # (B,) image i with its own prompt i
        if metric == "pickscore":
            return (model.logit_scale.exp().float() * cos).tolist()
        return (100 * cos.clamp(min=0)).tolist()
    return score


def load_hpsv2(weights_dir, device):
    """HPSv2 through open_clip: the authors' checkpoint over the built-in ViT-H-14, or an open_clip folder."""
    open_clip = import_package("open_clip", "hpsv2", "open_clip_torch")
    folder = weights_folder(weights_dir, "hpsv2")
    names = sorted(os.listdir(folder))
    if "open_clip_config.json" in names:  # open_clip's own folder layout; it finds the weights itself
        if not any(n.endswith((".safetensors", ".bin", ".pth")) for n in names):
            raise UserError(f"{folder}: open_clip_config.json but no weights (*.safetensors, *.bin, *.pth)")
        arch, checkpoint = "local-dir:" + folder, None
    else:
        checkpoints = [n for n in names if n.endswith((".pt", ".pth", ".bin", ".safetensors"))]
        if len(checkpoints) != 1:
            raise UserError(f"{folder}: expected one checkpoint ({LAYOUT['hpsv2']}), found {checkpoints or 'none'}")
        arch, checkpoint = HPSV2_ARCH, os.path.join(folder, checkpoints[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:  # a wrong architecture or file: open_clip's strict load says which keys
        raise UserError(f"{folder}: metric 'hpsv2' cannot load it ({first_line(e)})") from None
    model.eval()

    @torch.no_grad()
    def score(images, prompts):
        pixels = torch.stack([preprocess(img) for img in images]).to(device)
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(list(prompts)).to(device), normalize=True)
        return (image_features * text_features).sum(-1).float().tolist()  # the diagonal of image @ text.T
    return score


def load_imagereward(weights_dir, device):
    """ImageReward through its package, fully local: the package reads bert-base-uncased from the hub when it
    builds the model, so its tokenizer function is swapped for one reading tokenizer/ while the model is built."""
    import_package("ImageReward", "imagereward", "image-reward")
    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP import blip_pretrain
    from transformers import BertTokenizer
    folder = weights_folder(weights_dir, "imagereward")
    checkpoint = require_file(os.path.join(folder, "ImageReward.pt"), "imagereward")
    med_config = require_file(os.path.join(folder, "med_config.json"), "imagereward")
    tokenizer_dir = os.path.join(folder, "tokenizer")
    require_file(os.path.join(tokenizer_dir, "vocab.txt"), "imagereward")

    def local_tokenizer():  # BLIP's tokenizer: BERT's, plus [DEC] (bos) and [ENC], in that order (their ids)
        tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_tokens(["[ENC]"], special_tokens=True)
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        return tokenizer

    hub_tokenizer, blip_pretrain.init_tokenizer = blip_pretrain.init_tokenizer, local_tokenizer
    try:
        model = ImageReward(med_config=med_config, device=device)
    except Exception as e:
        raise UserError(f"{folder}: metric 'imagereward' cannot build its model ({first_line(e)})") from None
    finally:
        blip_pretrain.init_tokenizer = hub_tokenizer
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # The package loads with strict=False; a file of another model would load silently, so check the parameters.
    missing = [name for name, _ in model.named_parameters() if name not in state]
    if missing:
        raise UserError(f"{checkpoint}: {len(missing)} of the model's parameters are missing, e.g. '{missing[0]}' "
                        "(not an ImageReward checkpoint?)")
    model.load_state_dict(state, strict=False)
    model.to(device).eval()

    @torch.no_grad()
    def score(images, prompts):  # the package's own scoring, one (prompt, image) pair at a time
        return [float(model.score(prompt, image)) for prompt, image in zip(prompts, images)]
    return score


def load_hpsv3(weights_dir, device):
    """HPSv3 through its package: its inference config with the base model pointed at the local folder."""
    hpsv3 = import_package("hpsv3", "hpsv3", "hpsv3")
    from omegaconf import OmegaConf  # hpsv3's own dependency, there whenever hpsv3 imports
    folder = weights_folder(weights_dir, "hpsv3")
    checkpoint = require_file(os.path.join(folder, "HPSv3.safetensors"), "hpsv3")
    base = os.path.join(folder, "Qwen2-VL-7B-Instruct")
    require_file(os.path.join(base, "config.json"), "hpsv3")
    config = OmegaConf.load(os.path.join(os.path.dirname(hpsv3.__file__), "config", "HPSv3_7B.yaml"))
    config.model_name_or_path = base  # the package would fetch Qwen/Qwen2-VL-7B-Instruct from the hub
    if torch.device(device).type != "cuda":  # its fp32 head meets the bf16 trunk only under CUDA autocast
        config.bf16, config.torch_dtype = False, "float32"
    with tempfile.TemporaryDirectory() as tmp:
        local_config = os.path.join(tmp, "HPSv3_7B.yaml")
        OmegaConf.save(config, local_config)
        try:
            inferencer = hpsv3.HPSv3RewardInferencer(config_path=local_config, checkpoint_path=checkpoint,
                                                     device=device)
        except Exception as e:
            raise UserError(f"{folder}: metric 'hpsv3' cannot load it ({first_line(e)})") from None

    @torch.no_grad()
    def score(images, prompts):
        return inferencer.reward(images, list(prompts))[:, 0].float().tolist()  # (mu, sigma): mu is the score
    return score


def load_drm_metric(model_path, drm_path, device):
    """Our DRM over the pipeline's transformer: clean images at t = 0, VAE mean (model.score_images)."""
    from model import default_sequence_length, encode_prompts, inference_dtype, load_drm, load_pipeline, score_images
    if not drm_path:
        raise UserError(f"metric 'drm' needs --drm CHECKPOINT (only the toy pipeline {TOY_MODEL} has a default)")
    pipe = load_pipeline(model_path, dtype=inference_dtype(model_path, device), device=device)
    drm, config = load_drm(drm_path, pipe.transformer)
    length = config.get("max_sequence_length", default_sequence_length(pipe))  # the T5 length the DRM learnt
    multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size

    @torch.no_grad()
    def score(images, prompts):
        sizes = {img.size for img in images}
        if len(sizes) > 1 or any(w % multiple or h % multiple for w, h in sizes):
            raise UserError(f"the DRM over {model_path} scores images of one size with sides divisible by "
                            f"{multiple}; this batch has sizes {sorted(sizes)}")
        pixels = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
                              for img in images]) / 127.5 - 1  # (B, 3, H, W) in [-1, 1], as step_sample decodes
        embeds, pooled = encode_prompts(pipe, prompts, length)
        return score_images(drm, pipe.vae, pixels.to(device), embeds, pooled).tolist()
    return score


def load_metric(metric, args, device):
    if metric == "drm":
        return load_drm_metric(args.model, args.drm, device)
    if metric in ("pickscore", "clip"):
        return load_clip(args.weights_dir, metric, device)
    return {"hpsv2": load_hpsv2, "imagereward": load_imagereward, "hpsv3": load_hpsv3}[metric](args.weights_dir,
                                                                                               device)


def score_run(scorer, samples, batch_size):
    scores = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        scores += scorer(load_images([s.file for s in batch]), [s.prompt for s in batch])
    return scores


# ----------------------------------------------------------------------------------------------------------------

def format_interval(stats):
    if stats["ci95"] is None:
        return "-"
    return f"[{stats['ci95'][0]:8.3f}, {stats['ci95'][1]:8.3f}]"


def check_args(args):
    if bool(args.run) == bool(args.compare):
        raise UserError("give one run folder, or --compare A B")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"--metrics {args.metrics}: unknown {unknown or 'none given'}; choose from {','.join(METRICS)}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return list(dict.fromkeys(metrics))


def main(args):
    metrics = check_args(args)
    specs = args.compare or [args.run]
    runs = {spec: read_run(spec, args.prompts) for spec in specs}
    if args.compare:
        spec_a, spec_b = args.compare
        check_pairable(spec_a, runs[spec_a], spec_b, runs[spec_b])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # 1. Score every run with each metric in turn (one model in memory at a time).
    scores = {spec: {} for spec in specs}  # spec -> metric -> [score per sample]
    for metric in metrics:
        try:
            scorer = load_metric(metric, args, device)
        except UserError as e:
            if not args.skip_unavailable:
                raise
            print(f"skipped: {e}", file=sys.stderr)
            continue
        for spec in specs:
            scores[spec][metric] = score_run(scorer, runs[spec], args.batch_size)
        del scorer
    scored = [m for m in metrics if m in scores[specs[0]]]
    if not scored:
        raise UserError(f"no metric of --metrics {args.metrics} could be loaded")

    # 2. Summaries per run and metric; paired differences B - A on the shared (prompt, seed) keys.
    rows = []
    for spec in specs:
        for i, sample in enumerate(runs[spec]):
            rows.append(dict(type="image", run=spec, file=sample.file, prompt=sample.prompt, seed=sample.seed,
                             **{m: scores[spec][m][i] for m in scored}))
    table = []
    for metric in scored:
        for spec in specs:
            stats = mean_interval(scores[spec][metric])
            rows.append(dict(type="summary", run=spec, metric=metric, **stats))
            table.append((spec, metric, stats, ""))
        if args.compare:
            a, b = ({s.key: v for s, v in zip(runs[spec], scores[spec][metric])} for spec in args.compare)
            stats = paired_difference(a, b)
            rows.append(dict(type="paired", a=args.compare[0], b=args.compare[1], metric=metric, **stats))
            table.append((f"{args.compare[1]} - {args.compare[0]}", metric, stats,
                          f"  B > A in {stats['b_better']:.0%}"))

    # 3. Write the JSONL and print the table.
    out = args.out or os.path.join(parse_run_spec(specs[0])[0], "evaluation.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    width = max(len(name) for name, *_ in table)
    print(f"{'run':<{width}}  {'metric':<11} {'n':>5} {'mean':>9}  95% t-interval")
    for name, metric, stats, note in table:
        sign = "+" if note else ""
        print(f"{name:<{width}}  {metric:<11} {stats['n']:>5} {stats['mean']:>{sign}9.3f}  {format_interval(stats)}"
              f"{note}")
    print(f"wrote {len(rows)} rows to {out}")
    return rows


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
