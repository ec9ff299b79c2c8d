"""reward_train.py --fsdp (FSDP2) on CPU: two-process torchrun runs (gloo) of the full backbone on a tiny pipeline,
against DDP with the same seed, killed with SIGKILL and resumed, the exported file loaded on one process, and the
flag combinations it refuses.

    python -m pytest -q test_reward_train_fsdp.py          # ~3 min on 2 CPU cores

Tolerances. FSDP gathers the same fp32 weights and computes the same per-rank gradients (up to ~1e-9 here: the
gathered weights are fresh tensors, so a few CPU kernels round differently), but sums the gradient norm over shards
(torch's fp32 norm of one 1.2M-element gradient is itself 4e-5 off float64, relative). AdamW amplifies such noise
where a gradient is ~0: its step divides by sqrt(v) + 1e-8, so such a weight may move by up to lr per step either
way. So: losses agree to the 5 decimals they are logged with, gradient norms to 1e-3 relative, no weight differs by
more than lr x steps (the most AdamW moves one), and the norm of the difference is below 1e-3 of sqrt(N) x lr x
steps, that bound's norm over all N weights. Measured: 8e-5 of it; a 4-step run whose gradients differ for real
(another --logit-mean, the same weights and data) was at 0.42 of it. A resumed FSDP run gets back the exact fp32
shards, AdamW state and RNG states, so it matches the uninterrupted one to 1e-6, as DDP's resume does.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

import data
import model
import reward_train
from data import UserError
from tiny_pipeline import save_tiny_pipeline

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
STEPS, LR = 6, 1e-3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    # 5 held-out pairs over 2 ranks at eval batch 2: rank 0 runs two batches, rank 1 one, unless FSDP pads it.
    root = tmp_path_factory.mktemp("pairs")
    return (data.make_demo_pairs(str(root), 16, size=32, seed=0, name="train.json"),
            data.make_demo_pairs(str(root), 5, size=32, seed=1, name="test.json"))


def train_command(tiny_dir, pair_files, out, *extra, launcher=TORCHRUN):
    return [*launcher, "reward_train.py", "--model", tiny_dir, "--train-data", pair_files[0], "--test-data",
            pair_files[1], "--resolution", "32", "--batch-size", "2", "--max-sequence-length", "16",
            "--num-workers", "0", "--eval-every", "3", "--eval-batch-size", "2", "--grad-accum", "2",
            "--backbone", "full", "--skip-last-blocks", "1", "--lr", str(LR), "--max-steps", str(STEPS),
            "--seed", "5", "--out", str(out), *extra]


def run(command, log, timeout=300):
    with open(log, "w") as f:
        result = subprocess.run(command, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    with open(log) as f:
        return result.returncode, f.read()


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def finished_run(tiny_dir, pair_files, out, *extra):
    rc, log = run(train_command(tiny_dir, pair_files, out, *extra), out.parent / f"{out.name}.txt")
    assert rc == 0, log[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_dir, pair_files, tmp_path_factory):
    return finished_run(tiny_dir, pair_files, tmp_path_factory.mktemp("ddp") / "out")


@pytest.fixture(scope="module")
def fsdp_run(tiny_dir, pair_files, tmp_path_factory):
    """FSDP with gradient checkpointing, checkpointed every 2 steps: compared with DDP (no checkpointing), and the
    uninterrupted run the kill-and-resume test must end at."""
    return finished_run(tiny_dir, pair_files, tmp_path_factory.mktemp("fsdp") / "out", "--fsdp",
                        "--gradient-checkpointing", "--save-every", "2")


def test_fsdp_matches_ddp(ddp_run, fsdp_run):
    ddp, fsdp = read_metrics(ddp_run), read_metrics(fsdp_run)
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, fsdp):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["train_acc"] == b["train_acc"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"], (a, b)
        assert a.get("eval") == b.get("eval")  # 5 pairs on 2 ranks: FSDP's padding counts for nothing
    assert fsdp[-1]["eval"]["pairs"] == 5
    expected, got = load_file(ddp_run / "drm.safetensors"), load_file(fsdp_run / "drm.safetensors")
    assert expected.keys() == got.keys()
    assert all(got[k].dtype == expected[k].dtype == torch.float32 and got[k].shape == expected[k].shape
               for k in expected)
    difference = torch.cat([(got[k] - expected[k]).flatten() for k in expected])  # (N,)
    bound = LR * STEPS
    assert difference.abs().max() <= bound
    assert difference.norm() <= 1e-3 * bound * math.sqrt(difference.numel()), float(difference.norm())


def test_fsdp_checkpoint_is_sharded_and_the_export_loads_on_one_process(tiny_dir, fsdp_run):
    checkpoint = torch.load(fsdp_run / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == STEPS and "drm" not in checkpoint and "optimizer" not in checkpoint
    shards = [f for f in os.listdir(fsdp_run) if f.startswith("checkpoint-step")]
    assert shards == [checkpoint["sharded"]] == [f"checkpoint-step{STEPS}"]  # the earlier ones are removed
    assert len([f for f in os.listdir(fsdp_run / shards[0]) if f.endswith(".distcp")]) == 2  # one per rank
    assert not [f for f in os.listdir(fsdp_run) if f.endswith(".tmp")]

    pipe = model.load_pipeline(tiny_dir)
    drm, config = model.load_drm(str(fsdp_run / "drm.safetensors"), pipe.transformer)
    assert config["mode"] == "full" and config["skip_last_blocks"] == 1
    stored = load_file(fsdp_run / "drm.safetensors")
    assert all(torch.equal(v, stored[k]) for k, v in drm.trainable_state_dict().items())
    assert not any(k.startswith(f"transformer.transformer_blocks.{drm.prefix_blocks}.") for k in stored)
    cfg = pipe.transformer.config
    scores = drm(torch.randn(2, 16, 4, 4), torch.tensor([0.0, 500.0]), torch.randn(2, 77 + 16, cfg.joint_attention_dim),
                 torch.randn(2, cfg.pooled_projection_dim))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def children(pid):
    """The processes whose parent is `pid` (torchrun's workers run in sessions of their own, so killing torchrun's
    process group would leave them running)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state, past the name
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(entry))
    return found


def kill(*pids):
    """SIGKILL the launcher first (so it cannot react to its workers dying), then each worker."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_fsdp_killed_and_resumed_matches_uninterrupted(tiny_dir, pair_files, fsdp_run, tmp_path):
    out = tmp_path / "out"
    command = train_command(tiny_dir, pair_files, out, "--fsdp", "--gradient-checkpointing", "--save-every", "2")
    checkpoint = out / "checkpoint.pt"
    with open(tmp_path / "killed.txt", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        workers = []
        try:
            deadline = time.time() + 240
            while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            workers = children(process.pid)
            kill(process.pid, *workers)
            process.wait()
        finally:
            kill(process.pid, *workers, *children(process.pid))
            process.wait()
    killed_at = torch.load(checkpoint, weights_only=False)["step"]
    assert 2 <= killed_at < STEPS, (tmp_path / "killed.txt").read_text()[-3000:]
    # As if it had died while writing the next shards: a half folder that checkpoint.pt does not name.
    half = out / f"checkpoint-step{killed_at + 2}"
    half.mkdir(exist_ok=True)
    (half / "__0_0.distcp").write_bytes(b"\0" * 7)

    rc, log = run(command + ["--resume", "latest"], tmp_path / "resumed.txt")
    assert rc == 0, log[-3000:]
    assert f"resumed from {checkpoint} at step {killed_at}" in log
    resumed, reference = load_file(out / "drm.safetensors"), load_file(fsdp_run / "drm.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6, rtol=0) for k in reference)
    rows, uninterrupted = read_metrics(out), read_metrics(fsdp_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in uninterrupted]


def test_fsdp_bf16_master_weights_stay_fp32(tiny_dir, pair_files, ddp_run, tmp_path):
    """The CUDA recipe's path (bf16 gathers and compute over fp32 shards, fp32 gradient reduction) on the CPU: the
    exported weights are the fp32 masters and the first loss is the fp32 run's up to bf16 rounding."""
    out = finished_run(tiny_dir, pair_files, tmp_path / "out", "--fsdp", "--precision", "bf16", "--max-steps", "2",
                       "--eval-every", "0")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert abs(rows[0]["loss"] - read_metrics(ddp_run)[0]["loss"]) < 1e-2
    assert {t.dtype for t in load_file(out / "drm.safetensors").values()} == {torch.float32}


def test_fsdp_refuses_to_resume_a_ddp_checkpoint(tiny_dir, pair_files, ddp_run, tmp_path):
    rc, log = run(train_command(tiny_dir, pair_files, tmp_path / "out", "--fsdp", "--resume",
                                str(ddp_run / "checkpoint.pt")), tmp_path / "log.txt")
    errors = {line for line in log.splitlines() if line.startswith("error:")}  # one line, from each rank
    assert rc != 0 and len(errors) == 1 and "without --fsdp: drop --fsdp" in errors.pop(), log[-3000:]


@pytest.mark.parametrize("extra, torchrun, expected", [
    (["--backbone", "lora"], True, "--backbone lora"),
    (["--backbone", "frozen"], True, "--backbone frozen"),
    (["--compile"], True, "--compile"),
    ([], False, "torchrun"),
])
def test_fsdp_bad_flag_combinations_are_user_errors(tiny_dir, pair_files, monkeypatch, extra, torchrun, expected):
    if torchrun:
        monkeypatch.setenv("RANK", "0")
    else:
        monkeypatch.delenv("RANK", raising=False)
    args = reward_train.parse_args(train_command(tiny_dir, pair_files, "unused", "--fsdp", *extra, launcher=[])[1:])
    with pytest.raises(UserError, match=expected.replace("-", r"\-")):
        reward_train.check_args(args)


def test_fsdp_without_torchrun_is_a_one_line_error(tiny_dir, pair_files, tmp_path):
    rc, log = run(train_command(tiny_dir, pair_files, tmp_path / "out", "--fsdp", launcher=[sys.executable]),
                  tmp_path / "log.txt", timeout=120)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in log and len(errors) == 1 and "torchrun" in errors[0], log[-3000:]
