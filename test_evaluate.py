"""evaluate.py: each metric on a tiny random model of its own classes, saved and loaded back through the path users
take, against an independent computation of its formula; the run readers; the statistics; the CLI's one-line
errors (rc 2). Metrics whose package is not installed are skipped with the reason."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from evaluate import mean_interval, paired_difference, read_run, t_quantile_975

ROOT = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["a red circle", "a blue square left of a green circle", "a yellow triangle above a red square"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def write_images(folder, count, size=32, seed=0, prefix="img"):
    """Random smooth RGB PNGs: noise upsampled, so resizing them is not a no-op."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        path = os.path.join(folder, f"{prefix}_{i:05d}.png")
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def write_grid_run(folder, prompts, seeds=(0, 1), size=32):
    """A folder as step_sample.py --grid writes it: k_*.png (k = 4) and k1_*.png (k = 1), one results.jsonl."""
    jobs = [(p, s) for p in prompts for s in seeds]
    rows = []
    for name, k, seed in (("k", 4, 0), ("k1", 1, 100)):
        paths = write_images(folder, len(jobs), size, seed, prefix=name)
        rows += [dict(prompt=p, seed=s, k=k, best_of_n=None, drm_score=0.0, step_scores=[], file=path)
                 for (p, s), path in zip(jobs, paths)]
    with open(os.path.join(folder, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def import_or_skip(module):
    """pytest.importorskip, but also skipping a package that is installed and fails to import here."""
    try:
        return pytest.importorskip(module, exc_type=ImportError)
    except Exception as e:  # pytest.skip's own exception is not an Exception: it passes through
        pytest.skip(f"{module} does not import here: {e}")


# ----------------------------------------------------------------------------------------------------------------
# Statistics

def test_t_quantiles_match_the_exact_values():
    exact = {1: 12.7062, 2: 4.3027, 10: 2.2281, 30: 2.0423, 31: 2.0395, 40: 2.0211, 100: 1.9840, 1000: 1.9623}
    for df, value in exact.items():
        assert t_quantile_975(df) == pytest.approx(value, abs=1e-4)


def test_mean_interval_and_paired_difference():
    stats = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.1824 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert stats["n"] == 4 and stats["mean"] == 2.5
    assert stats["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert mean_interval([5.0]) == dict(n=1, mean=5.0, std=None, ci95=None)
    # Pairing: B = A + 1 + small noise; the paired interval is tight although A spreads widely.
    a = {("p", i): float(10 * i) for i in range(8)}
    b = {key: v + 1 + 0.01 * (-1) ** key[1] for key, v in a.items()}
    stats = paired_difference(a, b)
    assert stats["mean"] == pytest.approx(1.0) and stats["b_better"] == 1.0
    assert stats["ci95"][0] > 0.98 and stats["ci95"][1] < 1.02


# ----------------------------------------------------------------------------------------------------------------
# Runs

def test_grid_folder_selects_each_method_and_survives_a_move(tmp_path):
    rows = write_grid_run(str(tmp_path / "demo"), PROMPTS)
    os.rename(tmp_path / "demo", tmp_path / "moved")  # the recorded paths now point nowhere
    k4, k1 = read_run(f"{tmp_path}/moved:k=4"), read_run(f"{tmp_path}/moved:k=1")
    assert len(k4) == len(k1) == len(rows) // 2
    assert [s.key for s in k4] == [s.key for s in k1] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert all(os.path.basename(s.file).startswith("k_") and os.path.isfile(s.file) for s in k4)
    assert len(read_run(str(tmp_path / "moved"))) == len(rows)
    evaluate.check_pairable("A", k1, "B", k4)
    with pytest.raises(evaluate.UserError, match="several images share"):
        evaluate.check_pairable("A", read_run(str(tmp_path / "moved")), "B", k4)
    with pytest.raises(evaluate.UserError, match="not the same prompts and seeds"):
        evaluate.check_pairable("A", k1[:-1], "B", k4)
    with pytest.raises(evaluate.UserError, match="no row matches"):
        read_run(f"{tmp_path}/moved:k=6")


def test_any_folder_with_a_prompt_file(tmp_path):
    write_images(str(tmp_path / "imgs"), 4)
    (tmp_path / "prompts.txt").write_text("a red circle\na red circle\na blue square\na red circle\n")
    samples = read_run(str(tmp_path / "imgs"), str(tmp_path / "prompts.txt"))
    assert [s.key for s in samples] == [("a red circle", 0), ("a red circle", 1), ("a blue square", 0),
                                        ("a red circle", 2)]


# ----------------------------------------------------------------------------------------------------------------
# PickScore and CLIP score: transformers' CLIPModel, tiny config

@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """weights/pickscore (processor in processor/, as PickScore_v1 ships none) and weights/clip (processor beside the
    model, as openai's CLIP repos): one tiny random CLIPModel with logit scale e^1.5."""
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    # A character-level CLIP tokenizer from files (as transformers 4 and 5 both read them); the PIL image processor.
    words = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-":
        words[c], words[c + "</w>"] = len(words), len(words) + 1
    vocab_dir = tmp_path_factory.mktemp("vocab")
    (vocab_dir / "vocab.json").write_text(json.dumps(words))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16, logit_scale_init_value=1.5)
    model = CLIPModel(config).eval()
    image_processor = image_processor_class(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    weights = tmp_path_factory.mktemp("weights")
    for metric, processor_dir in (("pickscore", "pickscore/processor"), ("clip", "clip")):
        model.save_pretrained(weights / metric)
        tokenizer.save_pretrained(weights / processor_dir)
        image_processor.save_pretrained(weights / processor_dir)
    return str(weights), model, tokenizer


def clip_cosines(model, tokenizer, images, prompts):
    """cos(image i, prompt i) computed by hand: PIL bicubic resize of the short side to 30, centre crop, /255,
    OpenAI mean/std; each tower's pooled output, its projection, L2-normalised."""
    pixels = []
    for img in images:
        w, h = img.size
        scale = 30 / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        left, top = (img.width - 30) // 2, (img.height - 30) // 2
        x = np.asarray(img.crop((left, top, left + 30, top + 30)), dtype=np.float32) / 255
        pixels.append(torch.from_numpy((x - OPENAI_MEAN) / OPENAI_STD).permute(2, 0, 1).float())
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=torch.stack(pixels)).pooler_output)
        text_embeds = model.text_projection(model.text_model(**text).pooler_output)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (image_embeds * text_embeds).sum(-1)


def test_pickscore_and_clip_score_match_their_formulas(clip_weights, tmp_path):
    weights, model, tokenizer = clip_weights
    files = write_images(str(tmp_path), 6, size=48)
    images = evaluate.load_images(files)
    prompts = [PROMPTS[i % 3] for i in range(6)]
    cos = clip_cosines(model, tokenizer, images, prompts)
    pickscore = evaluate.load_clip(weights, "pickscore", torch.device("cpu"))(images, prompts)
    clip_score = evaluate.load_clip(weights, "clip", torch.device("cpu"))(images, prompts)
    # PickScore (the authors' example): logit_scale.exp() * cos; CLIP score (torchmetrics): 100 * max(cos, 0).
    assert pickscore == pytest.approx((np.exp(1.5) * cos).tolist(), abs=1e-4)
    assert clip_score == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-3)


def test_cli_scores_a_folder_and_compares_two_runs(clip_weights, tmp_path):
    weights, model, tokenizer = clip_weights
    write_grid_run(str(tmp_path / "demo"), PROMPTS)
    out = tmp_path / "eval.jsonl"
    result = run_cli("--compare", f"{tmp_path}/demo:k=1", f"{tmp_path}/demo:k=4", "--metrics", "pickscore,clip",
                     "--weights-dir", weights, "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    images = {(r["run"], r["prompt"], r["seed"]): r for r in rows if r["type"] == "image"}
    assert len(images) == 12
    for metric in ("pickscore", "clip"):
        paired = next(r for r in rows if r["type"] == "paired" and r["metric"] == metric)
        diffs = [images[(f"{tmp_path}/demo:k=4", p, s)][metric] - images[(f"{tmp_path}/demo:k=1", p, s)][metric]
                 for p in PROMPTS for s in (0, 1)]
        assert paired["n"] == 6 and paired["mean"] == pytest.approx(np.mean(diffs))
        assert paired["ci95"] == pytest.approx(mean_interval(diffs)["ci95"])
        summary = next(r for r in rows if r["type"] == "summary" and r["metric"] == metric
                       and r["run"].endswith(":k=4"))
        assert summary["n"] == 6
    assert "95% t-interval" in result.stdout and "B > A in" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# HPSv2: open_clip, tiny config

TINY_OPEN_CLIP = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))


def open_clip_cosines(model, images, prompts, tokenizer):
    """cos(image i, prompt i) by hand: PIL bicubic resize of the short side to 32, centre crop, OpenAI mean/std."""
    pixels = []
    for img in images:
        x = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255  # square inputs: no crop
        pixels.append(torch.from_numpy((x - OPENAI_MEAN) / OPENAI_STD).permute(2, 0, 1).float())
    with torch.no_grad():
        image = model.visual(torch.stack(pixels))
        text = model.encode_text(tokenizer(prompts))
    return torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_hpsv2_matches_its_formula_in_both_layouts(tmp_path, monkeypatch):
    open_clip = import_or_skip("open_clip")
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    files = write_images(str(tmp_path / "imgs"), 4, size=48)
    images, prompts = evaluate.load_images(files), [PROMPTS[i % 3] for i in range(4)]
    expected = open_clip_cosines(model, images, prompts, open_clip.get_tokenizer("ViT-B-32")).tolist()
    # 1. open_clip's own folder layout: open_clip_config.json + weights.
    folder = tmp_path / "weights" / "hpsv2"
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=TINY_OPEN_CLIP, preprocess_cfg={})))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    scores = evaluate.load_hpsv2(str(tmp_path / "weights"), torch.device("cpu"))(images, prompts)
    assert scores == pytest.approx(expected, abs=1e-4)  # HPSv2 (img_score.py): the cosine, no logit scale
    # 2. The authors' file ({"state_dict": ...}.pt) over a built-in architecture (ViT-H-14 for real, tiny here).
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-hps.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(tmp_path / "configs"))
    monkeypatch.setattr(evaluate, "HPSV2_ARCH", "tiny-hps")
    for name in os.listdir(folder):
        os.remove(folder / name)
    torch.save({"state_dict": model.state_dict()}, str(folder / "HPS_v2.1_compressed.pt"))
    scores = evaluate.load_hpsv2(str(tmp_path / "weights"), torch.device("cpu"))(images, prompts)
    assert scores == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# ImageReward: the image-reward package (transformers < 5), its ViT swapped for a one-block one of the same class

def test_imagereward_matches_its_formula(tmp_path, monkeypatch):
    import_or_skip("ImageReward")
    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer
    folder = tmp_path / "weights" / "imagereward"
    (folder / "tokenizer").mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for p in PROMPTS for w in p.split()})
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    # ImageReward hard-codes ViT-L (300M parameters); a one-block ViT of the same class keeps the test fast.
    monkeypatch.setattr(blip_pretrain, "create_vit", lambda *a, **k: (
        VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2), 32))
    med_config = dict(architectures=["BertModel"], hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, vocab_size=len(words) + 2, type_vocab_size=2,
                      hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0, encoder_width=32,
                      add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      initializer_range=0.02, model_type="bert")  # hidden 768: the MLP head's fixed input width
    (folder / "med_config.json").write_text(json.dumps(med_config))
    torch.manual_seed(0)
    tokenizer = BertTokenizer(str(folder / "tokenizer" / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    monkeypatch.setattr(blip_pretrain, "init_tokenizer", lambda: tokenizer)
    model = ImageReward(med_config=str(folder / "med_config.json"), device="cpu").eval()
    torch.save(model.state_dict(), str(folder / "ImageReward.pt"))
    # evaluate.py must build it from tokenizer/, never through the package's hub tokenizer.
    monkeypatch.setattr(blip_pretrain, "init_tokenizer", lambda: pytest.fail("the hub tokenizer was asked for"))
    files = write_images(str(tmp_path / "imgs"), 3, size=64)
    images, prompts = evaluate.load_images(files), PROMPTS
    scores = evaluate.load_imagereward(str(tmp_path / "weights"), "cpu")(images, prompts)
    # ImageReward = (MLP(BLIP's text CLS, cross-attending the image) - mean) / std, images at 224 px, 35 tokens.
    expected = []
    for img, prompt in zip(images, prompts):
        x = np.asarray(img.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
        pixels = torch.from_numpy((x - OPENAI_MEAN) / OPENAI_STD).permute(2, 0, 1)[None].float()
        ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            image_embeds = model.blip.visual_encoder(pixels)
            cls = model.blip.text_encoder(ids.input_ids, attention_mask=ids.attention_mask,
                                          encoder_hidden_states=image_embeds,
                                          encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                                          return_dict=True).last_hidden_state[:, 0]
            expected.append(float((model.mlp(cls) - 0.16717362830052426) / 1.0333394966054072))
    assert scores == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# HPSv3: the hpsv3 package (transformers 4.45), over a tiny random Qwen2-VL with a byte-level tokenizer

def tiny_qwen2_vl(folder):
    """A Qwen2-VL base folder (model, tokenizer, image processor, chat template) of a few MB, in HPSv3's layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (Qwen2TokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials + ["<|endoftext|>"]}
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     chat_template=template).save_pretrained(folder)


def test_hpsv3_matches_its_formula(tmp_path):
    hpsv3 = import_or_skip("hpsv3")
    from omegaconf import OmegaConf
    from transformers import Qwen2VLForConditionalGeneration
    folder = tmp_path / "weights" / "hpsv3"
    tiny_qwen2_vl(str(folder / "Qwen2-VL-7B-Instruct"))
    # The reward model as the package builds it over that base (random head, scaled up so scores spread), saved as
    # its checkpoint; read back through evaluate.py, then scored by hand with the package's inputs.
    config = OmegaConf.load(os.path.join(os.path.dirname(hpsv3.__file__), "config", "HPSv3_7B.yaml"))
    config.model_name_or_path, config.bf16, config.torch_dtype = str(folder / "Qwen2-VL-7B-Instruct"), False, "float32"
    OmegaConf.save(config, str(tmp_path / "config.yaml"))
    checkpoint = save_hpsv3(folder, str(tmp_path / "config.yaml"))
    inferencer = hpsv3.HPSv3RewardInferencer(config_path=str(tmp_path / "config.yaml"), checkpoint_path=checkpoint,
                                             device="cpu")
    files = write_images(str(tmp_path / "imgs"), 3, size=64)
    images, prompts = evaluate.load_images(files), PROMPTS
    scores = evaluate.load_hpsv3(str(tmp_path / "weights"), "cpu")(images, prompts)
    # HPSv3 = mu of rm_head(last hidden state at the <|Reward|> token), the head giving (mu, sigma).
    batch = inferencer.prepare_batch(images, prompts)
    model = inferencer.model
    with torch.no_grad():
        hidden = Qwen2VLForConditionalGeneration.forward(model, **batch, output_hidden_states=True).hidden_states[-1]
        reward_id = inferencer.processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
        expected = model.rm_head(hidden[batch["input_ids"] == reward_id].float())[:, 0]  # (B,)
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert max(scores) - min(scores) > 1e-4


def save_hpsv3(folder, config_path):
    """HPSv3.safetensors: the package's own model over the tiny base, its random head scaled by 100."""
    from safetensors.torch import save_file
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml
    (_, training_args, model_config, lora_config), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), config_path, is_train=False)
    torch.manual_seed(1)
    model, _, _ = create_model_and_processor(model_config=model_config, peft_lora_config=lora_config,
                                             training_args=training_args)
    state = {k: (100 * v if k.startswith("rm_head.") else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "HPSv3.safetensors"))
    return str(folder / "HPSv3.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# The DRM: a tiny random pipeline and DRM, scored at t = 0 as step_sample scores final images

@pytest.fixture(scope="module")
def tiny_drm(tmp_path_factory):
    from model import DRM, save_drm
    from tiny_pipeline import save_tiny_pipeline
    root = tmp_path_factory.mktemp("drm")
    pipeline = save_tiny_pipeline(root / "pipeline")
    from model import load_pipeline
    pipe = load_pipeline(pipeline)
    torch.manual_seed(0)
    drm = DRM(pipe.transformer, skip_last_blocks=1)
    save_drm(drm, str(root / "drm.safetensors"), base_model=pipeline, max_sequence_length=16)
    return pipeline, str(root / "drm.safetensors"), pipe, drm.eval()


def test_drm_matches_the_clean_image_score(tiny_drm, tmp_path):
    pipeline, checkpoint, pipe, drm = tiny_drm
    files = write_images(str(tmp_path), 3, size=32)
    images = evaluate.load_images(files)
    scores = evaluate.load_drm_metric(pipeline, checkpoint, torch.device("cpu"))(images, PROMPTS)
    # By hand: pixels in [-1, 1] -> VAE mean -> (x - shift) * scale -> DRM at timestep 0 with SD3's embeddings.
    pixels = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) for img in images])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels / 127.5 - 1).latent_dist.mean
        latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=16)
        expected = drm(latents, torch.zeros(3), embeds, pooled)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    with pytest.raises(evaluate.UserError, match="divisible by 4"):
        evaluate.load_drm_metric(pipeline, checkpoint, torch.device("cpu"))(
            evaluate.load_images(write_images(str(tmp_path / "odd"), 1, size=30)), PROMPTS[:1])


# ----------------------------------------------------------------------------------------------------------------
# One-line errors from the CLI, rc 2

def test_cli_errors_are_one_line(tmp_path):
    write_images(str(tmp_path / "imgs"), 3)
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "three.txt").write_text("a red circle\na blue square\na yellow circle\n")
    imgs, weights, three = str(tmp_path / "imgs"), str(tmp_path / "weights"), str(tmp_path / "three.txt")
    # As a subprocess (rc 2, one line on stderr): a missing weights folder, a wrong layout, a count mismatch.
    assert_one_line_error(run_cli(imgs, "--prompts", three, "--metrics", "pickscore", "--weights-dir", weights),
                          os.path.join(weights, "pickscore"), "no such folder")
    os.makedirs(os.path.join(weights, "clip"))
    assert_one_line_error(run_cli(imgs, "--prompts", three, "--metrics", "clip", "--weights-dir", weights),
                          os.path.join(weights, "clip", "config.json"), "missing")
    assert_one_line_error(run_cli(imgs, "--prompts", str(tmp_path / "two.txt"), "--metrics", "clip"),
                          imgs, str(tmp_path / "two.txt"), "3 images", "2 prompts")
    # The other user errors, in process (the same UserError the CLI prints).
    with open(os.path.join(weights, "clip", "config.json"), "w") as f:
        json.dump({"model_type": "bert"}, f)
    os.makedirs(os.path.join(weights, "hpsv2"))
    for argv, needle in (([imgs, "--prompts", three, "--metrics", "clip"], "model_type 'bert'"),
                         ([imgs, "--prompts", three, "--metrics", "hpsv2"], "hpsv2"),  # no package, or no checkpoint
                         ([imgs, "--metrics", "clip"], "no results.jsonl"),
                         ([imgs, "--prompts", three, "--metrics", "fid"], "fid"),
                         ([str(tmp_path / "nowhere"), "--metrics", "clip"], "nowhere"),
                         ([imgs, "--prompts", three, "--metrics", "drm", "--model", imgs, "--drm", "x"],
                          "model_index.json"),
                         (["--compare", imgs, imgs, "--prompts", str(tmp_path / "two.txt")], "2 prompts")):
        with pytest.raises(evaluate.UserError) as error:
            evaluate.main(evaluate.parse_args(argv + ["--weights-dir", weights]))
        assert needle in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_unavailable_package_is_one_line_and_can_be_skipped(clip_weights, tmp_path, capsys):
    missing = [m for m, module in (("hpsv3", "hpsv3"), ("imagereward", "ImageReward"))
               if not evaluate.importlib.util.find_spec(module)]
    if not missing:
        pytest.skip("hpsv3 and image-reward are both installed here")
    write_images(str(tmp_path / "imgs"), 3)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = [str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"), "--weights-dir", clip_weights[0]]
    with pytest.raises(evaluate.UserError, match=f"metric '{missing[0]}' needs the package .* not installed"):
        evaluate.main(evaluate.parse_args(argv + ["--metrics", missing[0]]))
    rows = evaluate.main(evaluate.parse_args(argv + ["--metrics", f"{missing[0]},clip", "--skip-unavailable"]))
    assert f"skipped: metric '{missing[0]}'" in capsys.readouterr().err
    assert {r["metric"] for r in rows if r["type"] == "summary"} == {"clip"}
