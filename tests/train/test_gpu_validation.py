"""train.py --valid_data_file on GPUs: under DeepSpeed in bf16 with --state_cp, and on two GPUs (each its share of
the windows, the sums added), the last valid.tsv row against evaluate.py on rwkv-final.pth.

Run on a CUDA machine with deepspeed installed: `python -m pytest -m gpu -s tests/train/test_gpu_validation.py`.
"""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from src.eval import valid_tsv

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

# L6 D512 on the built-in data, 2 mini-epochs of 10 steps of 4 x 512 tokens
L6 = ["--data_type", "dummy", "--n_layer", "6", "--n_embd", "512", "--ctx_len", "512", "--micro_bsz", "4",
      "--epoch_steps", "10", "--epoch_count", "2", "--epoch_save", "0", "--lr_init", "1e-3", "--lr_final", "1e-3",
      "--random_seed", "1", "--enable_progress_bar", "0", "--accelerator", "gpu"]


def held_out_text(folder):
    """Sums of other numbers than the built-in data's, in its characters."""
    path = folder / "held_out.txt"
    path.write_text("".join(f".{i * 7 % 10000}+{i * 13 % 10000}={i * 7 % 10000 + i * 13 % 10000}." for i in
                            range(3000)), encoding="utf-8")
    return path


def run(script, *argv):
    child = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, (child.stdout + child.stderr)[-3000:]
    return child.stdout


def evaluated(proj_dir, held_out, *flags) -> dict:
    out = run("evaluate.py", "--load_model", str(proj_dir / "rwkv-final.pth"), "--data_file", str(held_out),
              "--ctx_len", "512", "--micro_bsz", "4", "--accelerator", "gpu", *flags)
    return json.loads(out.splitlines()[-1])


@needs_deepspeed
@pytest.mark.gpu
def test_deepspeed_bf16_state_cp_rows_match_evaluate(tmp_path):
    held_out = held_out_text(tmp_path)
    run("train.py", *L6, "--precision", "bf16", "--strategy", "deepspeed_stage_2", "--state_cp", "1", "--ctx_parts",
        "2", "--valid_data_file", str(held_out), "--proj_dir", str(tmp_path / "out"))
    rows = valid_tsv.read_rows(tmp_path / "out")
    result = evaluated(tmp_path / "out", held_out, "--precision", "bf16", "--state_cp", "1", "--ctx_parts", "2")
    print(f"\n[valid] deepspeed_stage_2 bf16: valid.tsv {[round(r['loss'], 4) for r in rows]}, evaluate.py "
          f"{result['loss']:.4f} at {result['tokens_per_s']:,.0f} tokens/s")
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["loss"] < rows[0]["loss"]
    # DeepSpeed trains bf16 weights, which the file holds; the two differ by autocast's fp32 norms only
    assert abs(rows[-1]["loss"] - result["loss"]) <= 0.02 and rows[-1]["tokens"] == result["tokens"]


@two_gpus
@pytest.mark.gpu
def test_two_gpus_add_their_shares(tmp_path):
    held_out = held_out_text(tmp_path)
    run("train.py", *L6, "--precision", "fp32", "--strategy", "ddp", "--devices", "2", "--valid_data_file",
        str(held_out), "--proj_dir", str(tmp_path / "out"))
    (last,) = valid_tsv.read_rows(tmp_path / "out")[-1:]
    result = evaluated(tmp_path / "out", held_out)  # one GPU, every window
    print(f"\n[valid] ddp on 2 GPUs: {last['loss']:.6f} over {last['tokens']:,} targets; evaluate.py on one: "
          f"{result['loss']:.6f}")
    assert last["tokens"] == result["tokens"] and abs(last["loss"] - result["loss"]) <= 1e-5
