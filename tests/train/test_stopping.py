"""Ctrl+C / SIGTERM on a real train.py process group: save, exit 130/143, resume bit-exactly; resume bundles
checked before anything is written (missing, damaged, other flags or data, finished, another --proj_dir)."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train
from helpers import folder_snapshot, refused_in_one_line, stopped_by_one_sigint
from src.io.checkpoint import load_weights
from src.io.run_lock import LOCK_NAME
from src.io.outputs import BUNDLE_NAME
from conftest import ROOT

# 3 mini-epochs of 12 optimizer steps (accumulating 2 micro-batches each); fp32 on CPU is deterministic
RUN = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "32", "--ctx_len", "32", "--micro_bsz", "4",
       "--epoch_steps", "24", "--accumulate_grad_batches", "2", "--epoch_count", "3", "--epoch_save", "1",
       "--lr_init", "2e-3", "--lr_final", "5e-4", "--random_seed", "5", "--wkv_backend", "torch",
       "--enable_progress_bar", "0"]


def start(proj_dir, *extra):
    """train.py in its own process group, as a terminal runs it (Ctrl+C reaches every process of the group)."""
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
    assert "weights_only" not in output and "litlogger" not in output  # no library chatter
    assert "Stopped: trained" in output and "rwkv-last.pth, rwkv-resume.ckpt" in output.splitlines()[-1]
    stopped_at = len(step_rows(proj_dir))
    assert 1 <= stopped_at < 36, "the signal should land inside the run"
    last = load_weights(proj_dir / "rwkv-last.pth")
    assert set(last) == set(load_weights(straight_run / "rwkv-final.pth"))
    assert (proj_dir / BUNDLE_NAME).is_file() and no_temporary_files(proj_dir)

    assert train.main([*RUN, "--proj_dir", str(proj_dir), "--resume", str(proj_dir / BUNDLE_NAME)]) == 0
    assert not (proj_dir / BUNDLE_NAME).exists()  # spent: the finished run's files are newer than its state
    assert losses(proj_dir) == losses(straight_run)  # the same loss at every optimizer step
    for name in ("rwkv-2.pth", "rwkv-final.pth"):
        resumed, straight = load_weights(proj_dir / name), load_weights(straight_run / name)
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name
    epoch_lines = [line.split()[:4] for line in (proj_dir / "train_log.txt").read_text().splitlines()
                   if line[:1].isdigit()]
    assert epoch_lines == [line.split()[:4] for line in (straight_run / "train_log.txt").read_text().splitlines()
                           if line[:1].isdigit()]


def test_max_steps_before_the_schedule_ends_saves_as_a_stop_and_resumes_exactly(straight_run, tmp_path, capsys):
    """--max_steps 17 ends the run inside mini-epoch 1: rwkv-last.pth and the resume bundle, exit 0, no
    rwkv-final.pth (the original saved nothing of it). Resumed without the cap, it ends where the straight run ends;
    resumed with a cap it has already reached, it is refused."""
    proj_dir = tmp_path / "out"
    command = [*RUN, "--proj_dir", str(proj_dir)]
    assert train.main([*command, "--max_steps", "17"]) == 0
    assert (f"Reached --max_steps 17 before the end of the schedule after optimizer step 17. Saved {proj_dir}/"
            f"rwkv-last.pth and {proj_dir / BUNDLE_NAME}") in capsys.readouterr().err
    assert len(step_rows(proj_dir)) == 17 and not (proj_dir / "rwkv-final.pth").exists()
    assert (proj_dir / "rwkv-last.pth").is_file() and (proj_dir / BUNDLE_NAME).is_file()
    bundle = str(proj_dir / BUNDLE_NAME)
    refused_in_one_line([*command, "--resume", bundle, "--max_steps", "17"], capsys,
                        f"--resume {bundle}: the stopped run took 17 optimizer steps, and --max_steps 17 leaves none")
    assert train.main([*command, "--resume", bundle]) == 0
    assert not (proj_dir / BUNDLE_NAME).exists() and losses(proj_dir) == losses(straight_run)
    resumed, straight = load_weights(proj_dir / "rwkv-final.pth"), load_weights(straight_run / "rwkv-final.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_max_steps_at_the_end_of_a_mini_epoch_keeps_its_weights_in_rwkv_last(tmp_path, capsys):
    """--max_steps 4 is mini-epoch 1's last step (of 0..2, 2 optimizer steps each, saved every second one: not this
    one): rwkv-last.pth holds its weights, and the line says how to continue."""
    proj_dir = tmp_path / "out"
    short = {"--epoch_steps": "4", "--epoch_save": "2"}
    every_second = [short.get(RUN[i - 1], arg) if i else arg for i, arg in enumerate(RUN)]
    assert train.main([*every_second, "--proj_dir", str(proj_dir), "--max_steps", "4"]) == 0
    assert (f"Reached --max_steps 4 at the end of mini-epoch 1, before the end of the schedule. Saved {proj_dir}/"
            f"rwkv-last.pth; continue with --load_model {proj_dir}/rwkv-last.pth --epoch_begin 2"
            in capsys.readouterr().err)
    assert sorted(p.name for p in proj_dir.glob("*.pth")) == ["rwkv-0.pth", "rwkv-init.pth", "rwkv-last.pth"]
    assert not (proj_dir / BUNDLE_NAME).exists() and len(step_rows(proj_dir)) == 4


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
    """Samples of 1024 tokens make an optimizer step last about a second on a CPU, so the second Ctrl+C, 0.05 s
    after the first, lands while the run is still finishing its step (with RUN's 32 tokens a fast machine had
    already stopped and saved by then)."""
    proj_dir = tmp_path / "out"
    proc = start(proj_dir, "--ctx_len", "1024")
    wait_for_training(proc, proj_dir)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "SIGINT again: quitting at once" in output, output
    assert no_temporary_files(proj_dir) and not (proj_dir / LOCK_NAME).exists()
    for path in proj_dir.glob("*.pth"):
        load_weights(path)  # every file that exists is complete


def until(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


@pytest.mark.parametrize("signum, moment", [
    (signal.SIGINT, "while torch loads"),
    (signal.SIGTERM, "while the data and the model are prepared"),
])
def test_a_signal_during_start_up_stops_at_once_and_writes_nothing(tmp_path, signum, moment):
    proj_dir = tmp_path / "new" / "out"
    proc = subprocess.Popen([sys.executable, "train.py", *RUN, "--proj_dir", str(proj_dir)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if moment == "while torch loads":
        until(lambda: "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text(), proc)
    else:  # the run holds --proj_dir from here on
        until((proj_dir / LOCK_NAME).exists, proc)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, (out, err)
    assert err == f"train.py: {name} before training started: stopped; nothing was written\n", err
    assert "finishing this optimizer step" not in out + err
    assert list(tmp_path.iterdir()) == []  # not even the folder it was to write into


def test_two_ctrl_c_during_start_up_leave_nothing(tmp_path):
    """Ctrl+C twice in a row once the run holds --proj_dir: the first stops the start-up, the second (if it lands
    while the first one unwinds) quits at once; either way exit 130, no traceback, no lock, nothing written."""
    proj_dir = tmp_path / "new" / "out"
    proc = subprocess.Popen([sys.executable, "train.py", *RUN, "--proj_dir", str(proj_dir)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    until((proj_dir / LOCK_NAME).exists, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, (out, err)
    assert err in ("train.py: SIGINT before training started: stopped; nothing was written\n",
                   "\nSIGINT again: quitting at once; files already written are whole.\n"), err
    assert list(tmp_path.iterdir()) == []


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


# ---- resume bundles checked before anything is written (a run stopped in this process)

# relative paths, run from the test's folder: a copy of the folder resumes with the same flags
TEXT_RUN = ["--data_type", "utf-8", "--data_file", "text.txt", "--proj_dir", "out", "--n_layer", "1", "--n_embd", "16",
            "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "10", "--epoch_count", "100", "--epoch_save", "1",
            "--wkv_backend", "torch", "--enable_progress_bar", "0", "--random_seed", "3"]
BUNDLE = f"out/{BUNDLE_NAME}"


@pytest.fixture(scope="module")
def stopped_text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stopped")
    (folder / "text.txt").write_text("hello world, " * 40)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert stopped_by_one_sigint(TEXT_RUN, folder / "out") == 130
    assert (folder / BUNDLE).is_file()
    return folder


@pytest.fixture
def stopped(stopped_text_run, tmp_path, monkeypatch):
    """This test's own copy of the stopped run, as the current folder."""
    folder = shutil.copytree(stopped_text_run, tmp_path / "run")
    monkeypatch.chdir(folder)
    return folder


def test_a_finished_resumed_runs_bundle_is_removed(stopped, capsys):
    assert train.main([*TEXT_RUN, "--resume", BUNDLE, "--max_epochs", "1"]) == 0  # ends normally after mini-epoch 0
    assert "Removed the resume bundle out/rwkv-resume.ckpt" in capsys.readouterr().out
    assert not (stopped / BUNDLE).exists() and (stopped / "out" / "rwkv-0.pth").is_file()
    finished = folder_snapshot(stopped)
    # it cannot restart at the old step
    refused_in_one_line([*TEXT_RUN, "--resume", BUNDLE], capsys, "no such resume bundle")
    assert folder_snapshot(stopped) == finished


def test_resume_with_another_model_shape_lists_the_flags(stopped, capsys):
    before = folder_snapshot(stopped)
    refused_in_one_line([*TEXT_RUN, "--resume", BUNDLE, "--n_embd", "32", "--dim_ffn", "128"], capsys,
            "the bundle was made with other flags", "--n_embd 16 (bundle) vs 32 (now)",
            "--dim_ffn 64 (bundle) vs 128 (now)")
    assert folder_snapshot(stopped) == before


def test_resume_after_the_data_changed_lists_the_shape_mismatches(stopped, capsys):
    """Into another --proj_dir, which holds no vocab.json to compare the characters with."""
    (stopped / "text.txt").write_text("HELLO world, " * 40)  # three more characters: a larger vocabulary
    before = folder_snapshot(stopped)
    refused_in_one_line([*TEXT_RUN, "--resume", BUNDLE, "--proj_dir", "elsewhere"], capsys,
                        f"--resume {BUNDLE} does not fit the model", "emb.weight: file (9, 16) vs model (11, 16)",
                        "the stopped run's data")
    assert folder_snapshot(stopped) == before and not (stopped / "elsewhere").exists()


def test_resume_after_the_data_changed_lists_the_characters(stopped, capsys):
    (stopped / "text.txt").write_text("HELLO world, " * 40)
    before = folder_snapshot(stopped)
    refused_in_one_line([*TEXT_RUN, "--resume", BUNDLE], capsys,
                        "text.txt has other characters than out/vocab.json, the vocabulary of the checkpoints in "
                        "--proj_dir (11 characters vs 9; only in the data: 'E' 'H' 'L' 'O'; only in vocab.json: "
                        "'e' 'h')")
    assert folder_snapshot(stopped) == before


def test_a_damaged_bundle(stopped, capsys):
    bundle = stopped / BUNDLE
    bundle.write_bytes(bundle.read_bytes()[:1000])
    before = folder_snapshot(stopped)
    refused_in_one_line([*TEXT_RUN, "--resume", BUNDLE], capsys, f"--resume: {BUNDLE} is a damaged PyTorch file")
    assert folder_snapshot(stopped) == before


def test_a_new_run_in_a_stopped_runs_folder_is_pointed_to_resume(stopped, capsys):
    before = folder_snapshot(stopped)
    refused_in_one_line(TEXT_RUN, capsys, "already holds files this run would write", "rwkv-last.pth",
            f"it holds a stopped run: continue it with --resume {BUNDLE}")
    assert folder_snapshot(stopped) == before


def test_resume_into_another_proj_dir_does_not_replace_its_files(stopped, capsys):
    shutil.copytree("out", "other")
    before = folder_snapshot(stopped)
    refused_in_one_line([*TEXT_RUN, "--resume", BUNDLE, "--proj_dir", "other"], capsys,
            "--proj_dir other already holds files this run would write", "rwkv-last.pth")
    assert folder_snapshot(stopped) == before
