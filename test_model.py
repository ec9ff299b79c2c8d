"""model.py: the authors' checkpoint layout is scored as theirs, at the head depth their model names (24 blocks ->
m = 3, 38 -> 5) and with their 512 T5 tokens, wherever a stage loads it."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model
import step_grpo
import step_sample
from data import UserError
from tiny_pipeline import TINY_TRANSFORMER, build_tiny_pipeline, save_tiny_pipeline

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
HEAD = {"down1": (256, 16), "down2": (512, 256), "down3": (512, 512)}  # the authors' ConvGN stages: (out, in)


def authors_tensors(transformer, generator):
    """An authors'-layout state dict with random values: the full-depth transformer perturbed (so a wrong depth or a
    block left out changes the score) and a random ConvGN head."""
    tensors = {f"transformer.{k}": v + 0.05 * torch.randn(v.shape, generator=generator)
               for k, v in transformer.state_dict().items()}
    for stage, (out, inp) in HEAD.items():
        weight = torch.randn(out, inp, 3, 3, generator=generator) / math.sqrt(9 * inp)
        tensors[f"reward_output.{stage}.0.weight"] = weight
        tensors[f"reward_output.{stage}.0.bias"] = 0.1 * torch.randn(out, generator=generator)
        tensors[f"reward_output.{stage}.1.weight"] = 1 + 0.1 * torch.randn(out, generator=generator)
        tensors[f"reward_output.{stage}.1.bias"] = 0.1 * torch.randn(out, generator=generator)
    tensors["reward_output.mlp.0.weight"] = torch.randn(512, 512, generator=generator) / math.sqrt(512)
    tensors["reward_output.mlp.0.bias"] = 0.1 * torch.randn(512, generator=generator)
    tensors["reward_output.mlp.3.weight"] = torch.randn(1, 512, generator=generator) / math.sqrt(512)
    tensors["reward_output.mlp.3.bias"] = 0.1 * torch.randn(1, generator=generator)
    return {k: v.contiguous() for k, v in tensors.items()}


def first_blocks_score(transformer, tensors, latents, timestep, embeds, pooled, blocks):
    """The score from the first `blocks` blocks, written out (not through model.DRM): norm_out, proj_out,
    unpatchify, then the head as functional convolutions."""
    tr = transformer
    tr.load_state_dict({k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")})
    head = {k[len("reward_output."):]: v for k, v in tensors.items() if k.startswith("reward_output.")}
    p, (b, _, height, width) = tr.config.patch_size, latents.shape
    hidden, temb, context = tr.pos_embed(latents), tr.time_text_embed(timestep, pooled), tr.context_embedder(embeds)
    for block in tr.transformer_blocks[:blocks]:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    tokens = tr.proj_out(tr.norm_out(hidden, temb))
    c = tokens.shape[-1] // (p * p)
    x = tokens.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
    for stage in HEAD:
        x = F.conv2d(x, head[f"{stage}.0.weight"], head[f"{stage}.0.bias"], stride=2, padding=1)
        x = F.relu(F.group_norm(x, 32, head[f"{stage}.1.weight"], head[f"{stage}.1.bias"]))
    x = F.relu(F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), head["mlp.0.weight"], head["mlp.0.bias"]))
    return F.linear(x, head["mlp.3.weight"], head["mlp.3.bias"]).squeeze(-1)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))


@pytest.mark.parametrize("depth, m", [(24, 3), (38, 5)])
def test_authors_file_loads_at_the_depth_its_model_names(depth, m, generator, tmp_path):
    """Catches: m not derived from the depth (scored at another depth), a block skipped or repeated."""
    pipe = build_tiny_pipeline(seed=int(torch.randint(0, 1000, (), generator=generator)),
                               transformer_config=dict(TINY_TRANSFORMER, num_layers=depth))
    tensors = authors_tensors(pipe.transformer, generator)
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    drm, config = model.load_drm(path, pipe.transformer)
    assert drm.prefix_blocks == depth - m and config["skip_last_blocks"] == m
    assert config["max_sequence_length"] == 512  # the authors' training length
    cfg = pipe.transformer.config
    latents = torch.randn(3, 16, 16, 24, generator=generator)  # non-square: a swapped unpatchify would show
    timestep = torch.rand(3, generator=generator) * 1000
    embeds = torch.randn(3, 77 + 512, cfg.joint_attention_dim, generator=generator)
    pooled = torch.randn(3, cfg.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        scores = drm(latents, timestep, embeds, pooled)
        expected = first_blocks_score(pipe.transformer, tensors, latents, timestep, embeds, pooled, depth - m)
        one_more = first_blocks_score(pipe.transformer, tensors, latents, timestep, embeds, pooled, depth - m + 1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert (scores - one_more).abs().max() > 1e-4  # the depth matters: the check above can fail


def test_authors_file_of_another_depth_asks_for_the_flag(generator, tmp_path):
    pipe = build_tiny_pipeline(seed=0)  # 4 blocks: no authors' model has that depth
    path = str(tmp_path / "model.safetensors")
    save_file(authors_tensors(pipe.transformer, generator), path)
    with pytest.raises(UserError, match="--drm-skip-last-blocks"):
        model.load_drm(path, pipe.transformer)
    m = int(torch.randint(0, 4, (), generator=generator))
    drm, config = model.load_drm(path, pipe.transformer, skip_last_blocks=m)  # the flag's value
    assert drm.prefix_blocks == 4 - m and config["skip_last_blocks"] == m


def test_the_flag_cannot_change_the_depth_our_file_records(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    path = str(tmp_path / "drm.safetensors")
    model.save_drm(model.DRM(pipe.transformer, skip_last_blocks=1), path, max_sequence_length=16)
    assert model.load_drm(path, pipe.transformer, skip_last_blocks=1)[0].prefix_blocks == 3
    with pytest.raises(UserError, match="m=1"):
        model.load_drm(path, pipe.transformer, skip_last_blocks=2)


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    """A 24-block tiny pipeline folder and an authors' file over it."""
    root = tmp_path_factory.mktemp("deep")
    folder = save_tiny_pipeline(root / "pipeline", seed=5, transformer_config=dict(TINY_TRANSFORMER, num_layers=24))
    pipe = model.load_pipeline(folder)
    save_file(authors_tensors(pipe.transformer, torch.Generator().manual_seed(7)), str(root / "model.safetensors"))
    return folder, str(root / "model.safetensors")


def spy_prefix(monkeypatch):
    """Record the text length of every DRM prefix call."""
    lengths, prefix = [], model.DRM.prefix

    def recorded(self, latents, timestep, prompt_embeds, *args, **kwargs):
        lengths.append(prompt_embeds.shape[1])
        return prefix(self, latents, timestep, prompt_embeds, *args, **kwargs)
    monkeypatch.setattr(model.DRM, "prefix", recorded)
    return lengths


def test_step_sample_scores_an_authors_file_with_512_tokens(deep_folder, monkeypatch, tmp_path):
    """The generator encodes its prompts with its own length (256 here), the authors' DRM with 512. Catches: the DRM
    given the generator's embeddings."""
    folder, path = deep_folder
    lengths = spy_prefix(monkeypatch)
    step_sample.main(step_sample.parse_args(["--model", folder, "--drm", path, "--prompt", "a red circle", "--k", "2",
                                             "--steps", "3", "--height", "32", "--width", "32",
                                             "--out", str(tmp_path / "samples")]))
    assert lengths and set(lengths) == {77 + 512}


def test_prefix_reuse_turns_itself_off_when_the_lengths_differ(deep_folder, monkeypatch, tmp_path, capsys):
    """A frozen DRM of ours over the generator's own transformer, trained at 512 tokens, sampled at 256: its prefix
    activations are not the generator's, so they are not reused (one message), and the images equal --no-reuse's."""
    folder, _ = deep_folder
    pipe = model.load_pipeline(folder)
    drm = model.DRM(pipe.transformer, skip_last_blocks=3, train_output_layers=True)
    for p in drm.reward_output.parameters():
        p.data.normal_(0, 0.2)
    path = str(tmp_path / "drm512.safetensors")
    model.save_drm(drm, path, max_sequence_length=512)
    lengths = spy_prefix(monkeypatch)
    common = ["--model", folder, "--drm", path, "--prompt", "a red circle", "--k", "3", "--steps", "4", "--height",
              "32", "--width", "32"]
    reused = step_sample.main(step_sample.parse_args([*common, "--out", str(tmp_path / "a")]))
    out = capsys.readouterr().out
    assert out.count("not reused") == 1 and "512 T5 tokens, the generator 256" in out
    assert set(lengths) == {77 + 512}
    plain = step_sample.main(step_sample.parse_args([*common, "--no-reuse", "--out", str(tmp_path / "b")]))
    assert [r["drm_score"] for r in reused] == [r["drm_score"] for r in plain]


def test_step_grpo_scores_an_authors_file_with_512_tokens(deep_folder, monkeypatch, tmp_path):
    """The policy's prompts at Flow-GRPO's 128 tokens, the DRM's (step rewards and evaluation) at 512."""
    folder, path = deep_folder
    lengths = spy_prefix(monkeypatch)
    seen = []
    velocity = step_grpo.velocity
    monkeypatch.setattr(step_grpo, "velocity", lambda tr, x, t, embeds, *a, **kw: seen.append(embeds.shape[1]) or
                        velocity(tr, x, t, embeds, *a, **kw))
    step_grpo.main(step_grpo.parse_args([
        "--model", folder, "--drm", path, "--prompts", str(write(tmp_path / "p.txt", "a red circle\na blue square\n")),
        "--eval-prompts", str(tmp_path / "p.txt"), "--k", "2", "--steps", "2", "--eval-steps", "2", "--height", "32",
        "--width", "32", "--prompts-per-step", "1", "--max-steps", "1", "--lora-rank", "2", "--lora-alpha", "4",
        "--out", str(tmp_path / "run")]))
    assert lengths and set(lengths) == {77 + 512}
    assert seen and set(seen) == {77 + 128}


def write(path, text):
    path.write_text(text)
    return path


def test_cli_one_line_error_for_an_authors_file_of_another_depth(generator, tmp_path):
    folder = save_tiny_pipeline(tmp_path / "pipeline", seed=0)
    pipe = model.load_pipeline(folder)
    path = str(tmp_path / "model.safetensors")
    save_file(authors_tensors(pipe.transformer, generator), path)
    result = subprocess.run([sys.executable, os.path.join(REPO, "step_sample.py"), "--model", folder, "--drm", path,
                             "--prompt", "a red circle", "--out", str(tmp_path / "out")], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0])  # one line, the last
    assert "--drm-skip-last-blocks" in errors[0] and "4-block" in errors[0] and path in errors[0]
