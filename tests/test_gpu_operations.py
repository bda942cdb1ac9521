"""GPU operations: every --strategy trains, Ctrl+C under DeepSpeed saves and resumes, two GPUs match one.

Run on a CUDA machine with deepspeed installed: `python -m pytest -m gpu -s tests/test_gpu_operations.py`
(-s shows the figures each test prints). Two-GPU tests need two devices.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.io.checkpoint import load_weights
from src.io.outputs import BUNDLE_NAME

ROOT = Path(__file__).resolve().parents[1]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

# L12 D768 on the built-in data, bf16; 20 optimizer steps of 8 x 256 tokens
L12 = ["--data_type", "dummy", "--n_layer", "12", "--n_embd", "768", "--ctx_len", "256", "--epoch_steps", "20",
       "--epoch_count", "1", "--epoch_save", "0", "--lr_init", "6e-4", "--lr_final", "6e-4", "--precision", "bf16",
       "--random_seed", "1", "--enable_progress_bar", "0", "--accelerator", "gpu"]


def train_py(proj_dir, *argv, wait=True):
    proc = subprocess.Popen([sys.executable, "train.py", *argv, "--proj_dir", str(proj_dir)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=900)
    return proc.returncode, output


def step_log(proj_dir):
    rows = [row.split("\t") for row in (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]]
    return [(int(r[0]), float(r[2]), float(r[6])) for r in rows]  # step, loss, kt/s


def epoch_losses(proj_dir):
    return [float(line.split()[1]) for line in (proj_dir / "train_log.txt").read_text().splitlines()
            if line[:1].isdigit()]


def assert_trains(proj_dir, returncode, output, steps=20):
    assert returncode == 0, output[-3000:]
    log = step_log(proj_dir)
    assert [s for s, _, _ in log] == list(range(1, steps + 1))
    first, last = sum(l for _, l, _ in log[:5]) / 5, sum(l for _, l, _ in log[-5:]) / 5
    assert last < first - 0.2, (first, last)
    return first, last, log[-1][2]


@needs_deepspeed
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2",
                                      "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload"])
def test_each_strategy_trains_l12_d768_bf16(tmp_path, strategy):
    started = time.time()
    returncode, output = train_py(tmp_path, *L12, "--micro_bsz", "8", "--devices", "1", "--strategy", strategy)
    first, last, speed = assert_trains(tmp_path, returncode, output)
    weights = load_weights(tmp_path / "rwkv-final.pth")  # full shapes, also when ZeRO-3 partitioned them
    assert weights["blocks.11.ffn.key.weight"].shape == (3072, 768) and weights["emb.weight"].dtype == torch.bfloat16
    print(f"\n[strategy] {strategy}: loss {first:.3f} -> {last:.3f} over 20 steps, {speed:.1f} kt/s, "
          f"{time.time() - started:.0f} s with start-up")


def wait_for_rows(proc, proj_dir, rows, timeout=600):
    deadline = time.time() + timeout
    path = proj_dir / "train_steps.tsv"
    while not path.exists() or len(path.read_text().splitlines()) < rows + 1:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.2)


def interrupt_and_resume(tmp_path, argv) -> bool:
    """Ctrl+C (SIGINT to the whole process group) after the first logged rows, then --resume to the end.
    Returns whether the bundle the stop saved was a folder (DeepSpeed's sharded checkpoint) rather than a file."""
    proc = train_py(tmp_path, *argv, wait=False)
    wait_for_rows(proc, tmp_path, 0)  # header: training started
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, output[-3000:]
    assert output.count("Stopped after optimizer step") == 1  # one save, by rank 0
    stopped = len(step_log(tmp_path))
    assert 0 < stopped < 40 and (tmp_path / BUNDLE_NAME).exists() and (tmp_path / "rwkv-last.pth").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    bundle_is_folder = (tmp_path / BUNDLE_NAME).is_dir()
    returncode, output = train_py(tmp_path, *argv, "--resume", str(tmp_path / BUNDLE_NAME))
    assert returncode == 0, output[-3000:]
    steps = [s for s, _, _ in step_log(tmp_path)]
    assert steps == list(range(1, 41)), steps  # continues at the next step, nothing repeated or skipped
    assert not (tmp_path / BUNDLE_NAME).exists()  # the finished run retired the bundle it resumed from
    print(f"\n[ctrl-c] {' '.join(argv[-4:])}: stopped after step {stopped}, resumed to step 40")
    return bundle_is_folder


@needs_deepspeed
@pytest.mark.gpu
def test_ctrl_c_under_deepspeed_stage_2_saves_and_resumes(tmp_path):
    argv = [*L12, "--epoch_steps", "40", "--micro_bsz", "8", "--devices", "1", "--strategy", "deepspeed_stage_2"]
    assert interrupt_and_resume(tmp_path, argv)  # DeepSpeed's sharded checkpoint folder


def two_gpu_argv(strategy, devices, micro_bsz):
    return [*L12, "--epoch_steps", "15", "--epoch_count", "2", "--lr_final", "2e-4", "--micro_bsz", str(micro_bsz),
            "--devices", str(devices), "--strategy", strategy]


@two_gpus
@needs_deepspeed
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2"])
def test_two_gpus_match_one_gpu_at_the_same_global_batch(tmp_path, strategy):
    one, two = tmp_path / "one", tmp_path / "two"
    returncode, output = train_py(one, *two_gpu_argv(strategy, 1, 8))
    assert returncode == 0, output[-3000:]
    returncode, output = train_py(two, *two_gpu_argv(strategy, 2, 4))
    assert returncode == 0, output[-3000:]
    curve_one, curve_two = epoch_losses(one), epoch_losses(two)
    print(f"\n[two GPUs] {strategy}: mini-epoch losses 1 GPU x 8 {curve_one}, 2 GPUs x 4 {curve_two}")
    # different windows (each GPU samples its own), same global batch: the curves agree within sampling noise
    assert len(curve_one) == len(curve_two) == 2
    assert all(abs(a - b) < 0.1 * a for a, b in zip(curve_one, curve_two))


@two_gpus
@needs_deepspeed
@pytest.mark.gpu
def test_ctrl_c_on_two_gpus_saves_once_and_resumes(tmp_path):
    argv = [*L12, "--epoch_steps", "40", "--micro_bsz", "4", "--devices", "2", "--strategy", "deepspeed_stage_2"]
    interrupt_and_resume(tmp_path, argv)



@needs_deepspeed
@pytest.mark.gpu
def test_lora_bf16_under_deepspeed_stage_2_then_merge(tmp_path):
    """The issue's LoRA run: 20 bf16 steps under deepspeed_stage_2 on a saved base, then merge_lora.py."""
    import merge_lora
    from helpers import rwkv_pip_logits
    from src.io.checkpoint import save_weights
    from src.models.rwkv4.config import RWKVConfig
    from src.models.rwkv4.model import RWKV, generate_init_weights

    base = RWKV(RWKVConfig(vocab_size=13, n_layer=12, n_embd=768))  # the built-in data's 13 characters
    save_weights(generate_init_weights(base, 6e-4), tmp_path / "base.pth", torch.bfloat16)
    started = time.time()
    returncode, output = train_py(tmp_path / "lora", *L12, "--micro_bsz", "8", "--devices", "1", "--strategy",
                                  "deepspeed_stage_2", "--load_model", str(tmp_path / "base.pth"), "--lora",
                                  "--lora_r", "16", "--lora_alpha", "32", "--lora_parts", "att,ffn,time,ln",
                                  "--lr_init", "1e-3", "--lr_final", "1e-3")
    first, last, speed = assert_trains(tmp_path / "lora", returncode, output)
    lora_file = tmp_path / "lora" / "rwkv-final.pth"
    assert all(".lora_" in k or ".time_" in k or ".ln" in k or k == "lora_settings" for k in load_weights(lora_file))
    merge_started = time.time()
    assert merge_lora.main([str(tmp_path / "base.pth"), str(lora_file), str(tmp_path / "merged.pth")]) == 0
    merged = load_weights(tmp_path / "merged.pth")
    assert set(merged) == set(load_weights(tmp_path / "base.pth")) and merged["head.weight"].dtype == torch.bfloat16
    logits = rwkv_pip_logits(tmp_path / "merged.pth", [1, 2, 3, 4, 5])
    assert torch.isfinite(logits).all()
    print(f"\n[lora] deepspeed_stage_2 bf16 r16: loss {first:.3f} -> {last:.3f} over 20 steps, {speed:.1f} kt/s, "
          f"{merge_started - started:.0f} s with start-up; merge {time.time() - merge_started:.1f} s, "
          f"merged file loads in rwkv pip")
