"""Ctrl+C / SIGTERM on a real train.py process group: save, exit 130/143, resume bit-exactly."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from src.checkpoint import load_weights
from src.stopping import BUNDLE_NAME

ROOT = Path(__file__).resolve().parents[1]
# 3 mini-epochs of 12 optimizer steps (accumulating 2 micro-batches each); fp32 on CPU is deterministic
RUN = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "32", "--ctx_len", "32", "--micro_bsz", "4",
       "--epoch_steps", "24", "--accumulate_grad_batches", "2", "--epoch_count", "3", "--epoch_save", "1",
       "--lr_init", "2e-3", "--lr_final", "5e-4", "--random_seed", "5", "--wkv_backend", "torch",
       "--enable_progress_bar", "0"]


def start(proj_dir, *extra):
    """train.py in its own process group, as a terminal runs it (Ctrl+C reaches the DataLoader worker too)."""
    return subprocess.Popen([sys.executable, "train.py", *RUN, "--proj_dir", str(proj_dir), *extra], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_training(proc, proj_dir, timeout=120):
    """Until the step log exists (written when training starts)."""
    deadline = time.time() + timeout
    while not (proj_dir / "train_steps.tsv").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)


def step_rows(proj_dir):
    return (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]


def losses(proj_dir):
    return [row.split("\t")[:3] for row in step_rows(proj_dir)]  # step, epoch, loss


def no_temporary_files(proj_dir):
    return not [p.name for p in proj_dir.iterdir() if p.name.startswith(".")]


def interrupt(proj_dir, signum, *extra):
    proc = start(proj_dir, *extra)
    wait_for_training(proc, proj_dir)
    time.sleep(0.3)
    os.killpg(proc.pid, signum)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    proj_dir = tmp_path_factory.mktemp("straight")
    assert train.main([*RUN, "--proj_dir", str(proj_dir)]) == 0
    return proj_dir


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_save_and_resume_is_exact(straight_run, tmp_path, signum, code):
    proj_dir = tmp_path / "out"
    returncode, output = interrupt(proj_dir, signum)
    assert returncode == code, output
    assert "Traceback" not in output and f"--resume {proj_dir / BUNDLE_NAME}" in output
    stopped_at = len(step_rows(proj_dir))
    assert 1 <= stopped_at < 36, "the signal should land inside the run"
    last = load_weights(proj_dir / "rwkv-last.pth")
    assert set(last) == set(load_weights(straight_run / "rwkv-final.pth"))
    assert (proj_dir / BUNDLE_NAME).is_file() and no_temporary_files(proj_dir)

    assert train.main([*RUN, "--proj_dir", str(proj_dir), "--resume", str(proj_dir / BUNDLE_NAME)]) == 0
    assert losses(proj_dir) == losses(straight_run)  # the same loss at every optimizer step
    for name in ("rwkv-2.pth", "rwkv-final.pth"):
        resumed, straight = load_weights(proj_dir / name), load_weights(straight_run / name)
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name
    epoch_lines = [line.split()[:4] for line in (proj_dir / "train_log.txt").read_text().splitlines()
                   if line[:1].isdigit()]
    assert epoch_lines == [line.split()[:4] for line in (straight_run / "train_log.txt").read_text().splitlines()
                           if line[:1].isdigit()]


def test_state_cp_run_stops_and_resumes_exactly(tmp_path):
    """--state_cp 1 in segments of 8 tokens: the stopped and resumed run repeats the straight one bit for bit."""
    state_cp = ["--state_cp", "1", "--ctx_parts", "4", "--epoch_count", "2"]
    straight = tmp_path / "straight"
    assert train.main([*RUN, "--proj_dir", str(straight), *state_cp]) == 0
    proj_dir = tmp_path / "out"
    returncode, output = interrupt(proj_dir, signal.SIGINT, *state_cp)
    assert returncode == 130, output
    assert 1 <= len(step_rows(proj_dir)) < 24, "the signal should land inside the run"
    assert train.main([*RUN, "--proj_dir", str(proj_dir), *state_cp, "--resume", str(proj_dir / BUNDLE_NAME)]) == 0
    assert losses(proj_dir) == losses(straight)
    resumed, expected = load_weights(proj_dir / "rwkv-final.pth"), load_weights(straight / "rwkv-final.pth")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_second_ctrl_c_quits_at_once_leaving_files_whole(tmp_path):
    proj_dir = tmp_path / "out"
    proc = start(proj_dir)
    wait_for_training(proc, proj_dir)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Quitting now" in output, output
    assert no_temporary_files(proj_dir)
    for path in proj_dir.glob("*.pth"):
        load_weights(path)  # every file that exists is complete


def test_resume_refuses_other_flags(straight_run, tmp_path, capsys):
    proj_dir = tmp_path / "out"
    returncode, output = interrupt(proj_dir, signal.SIGINT)
    assert returncode == 130, output
    changed = [*RUN, "--proj_dir", str(proj_dir), "--resume", str(proj_dir / BUNDLE_NAME), "--lr_init", "1e-3"]
    assert train.main(changed) == 2
    err = capsys.readouterr().err
    assert "--lr_init 0.002 (bundle) vs 0.001 (now)" in err


def test_resume_needs_an_existing_bundle(tmp_path, capsys):
    assert train.main([*RUN, "--proj_dir", str(tmp_path), "--resume", str(tmp_path / "nope.ckpt")]) == 2
    assert "no such resume bundle" in capsys.readouterr().err
