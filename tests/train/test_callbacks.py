"""LR schedule: warm-up and decay endpoints, in optimizer steps. The step log written by count and by time; each
mini-epoch's own rate."""
import math
import re
import time

import lightning.pytorch as pl
import pytest

import train
from conftest import TINY_RUN
from src.train import callbacks
from src.train.callbacks import learning_rate
from src.config import parse_args


def config(*extra):
    return parse_args(["--data_type", "dummy", "--lr_init", "1e-3", "--lr_final", "1e-5", "--epoch_steps", "100",
                       "--epoch_count", "10", *extra])


def test_exponential_decay_endpoints_and_midpoint():
    cfg = config()
    total = 10 * 100
    assert learning_rate(0, cfg) == pytest.approx(1e-3 * (1e-2) ** (1 / total))
    assert learning_rate(total - 1, cfg) == pytest.approx(1e-5)
    assert learning_rate(total * 5, cfg) == pytest.approx(1e-5)  # stays at lr_final after epoch_count
    assert learning_rate(total // 2 - 1, cfg) == pytest.approx(1e-4)  # geometric mean halfway


def test_linear_decay_when_final_is_zero():
    cfg = config("--lr_final", "0")
    assert learning_rate(499, cfg) == pytest.approx(0.5e-3)
    assert learning_rate(999, cfg) == 0


def test_warmup_multiplies_from_0_2_to_1():
    cfg = config("--warmup_steps", "50", "--lr_final", "1e-3")
    assert learning_rate(0, cfg) == pytest.approx(0.2e-3)
    assert learning_rate(25, cfg) == pytest.approx(0.6e-3)
    assert learning_rate(50, cfg) == pytest.approx(1e-3)


def test_decay_starts_after_warmup():
    cfg = config("--warmup_steps", "100")
    assert learning_rate(99, cfg) == pytest.approx(1e-3 * (0.2 + 0.8 * 99 / 100))
    assert learning_rate(999, cfg) == pytest.approx(1e-5)


def test_accumulation_keeps_the_schedule_in_optimizer_steps():
    """epoch_steps counts micro-batches: with K=4 an epoch has 25 optimizer steps and the decay ends at step 249."""
    cfg = config("--accumulate_grad_batches", "4")
    assert learning_rate(249, cfg) == pytest.approx(1e-5)
    assert learning_rate(124, cfg) == pytest.approx(1e-4)


def test_resume_offsets_by_epoch_begin_or_previous_step():
    resumed = config("--epoch_begin", "5")
    straight = config()
    assert learning_rate(0, resumed) == pytest.approx(learning_rate(500, straight))
    explicit = config("--epoch_begin", "5", "--previous_step", "200")
    assert learning_rate(0, explicit) == pytest.approx(learning_rate(200, straight))


def test_no_division_by_zero_when_warmup_covers_the_decay():
    cfg = config("--epoch_count", "1", "--warmup_steps", "100")
    assert math.isfinite(learning_rate(100, cfg))


def test_wandb_logs_loss_lr_gtokens_and_speed_per_step(tmp_path, monkeypatch, capfd):
    """A real (offline) W&B run: its printed run history lists our four series."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = ["--data_type", "dummy", "--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2",
            "--epoch_steps", "5", "--epoch_count", "1", "--wkv_backend", "torch", "--enable_progress_bar", "0",
            "--proj_dir", str(tmp_path), "--wandb", "rwkv-test"]
    assert train.main(argv) == 0
    printed = capfd.readouterr()
    history = (printed.out + printed.err).split("Run history:")[1].split("Run summary:")[0]
    assert [line.split()[1] for line in history.splitlines() if line.startswith("wandb: ") and len(line.split()) > 2] \
        == ["Gtokens", "kt/s", "loss", "lr"]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# ---------------------------------------------------------------- the step log and the per-mini-epoch line


class Watch(pl.Callback):
    """Comes after TrainingLog: records the rows train_steps.tsv holds after each step, and can make steps slow."""

    def __init__(self, proj_dir, step_seconds=0.0, pause_after_epoch_0=0.0):
        self.steps = proj_dir / "train_steps.tsv"
        self.step_seconds, self.pause_after_epoch_0 = step_seconds, pause_after_epoch_0
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        time.sleep(self.step_seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(len(self.steps.read_text().splitlines()) - 1)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            time.sleep(self.pause_after_epoch_0)  # e.g. a slow save


def test_rows_reach_the_step_log_when_30_seconds_have_passed(tmp_path, monkeypatch):
    """Here every step ends 30 s or more after the last write (the interval set to 0): each one is on disk at once,
    not 20 steps later."""
    monkeypatch.setattr(callbacks, "_FLUSH_SECONDS", 0.0)
    watch = Watch(tmp_path)
    assert train.train(parse_args([*TINY_RUN, "--epoch_steps", "3", "--proj_dir", str(tmp_path)]), [watch]) == 0
    assert watch.rows == [1, 2, 3, 4, 5, 6]


def test_fast_steps_are_written_in_batches(tmp_path):
    watch = Watch(tmp_path)
    assert train.train(parse_args([*TINY_RUN, "--epoch_steps", "3", "--proj_dir", str(tmp_path)]), [watch]) == 0
    assert watch.rows == [0, 0, 0, 3, 3, 3]  # at the end of each mini-epoch (and every 20 steps)


def test_each_mini_epoch_line_gives_its_own_rate(tmp_path, capsys):
    """Mini-epoch 1 comes after a 1 s pause: its kt/s are its own tokens over its own seconds, not an average since
    the start."""
    watch = Watch(tmp_path, step_seconds=0.2, pause_after_epoch_0=1.0)
    cfg = parse_args([*TINY_RUN, "--ctx_len", "32", "--micro_bsz", "4", "--epoch_steps", "3", "--proj_dir",
                      str(tmp_path)])
    assert train.train(cfg, [watch]) == 0
    lines = re.findall(r"mini-epoch \d: loss \S+, lr \S+, (\S+) kt/s, ctx_len 32, (\S+) s", capsys.readouterr().out)
    assert len(lines) == 2
    for speed, seconds in lines:
        assert float(speed) * 1000 * float(seconds) == pytest.approx(3 * 4 * 32, rel=0.2), lines


def test_a_diverged_loss_stops_the_run_in_one_line_before_its_mini_epoch_is_saved(tmp_path):
    """DeepSpeed's bf16 overflow check is off (src/train/strategy.py): a loss that is no longer finite is caught when its
    mini-epoch ends, on every rank, before the mini-epoch's weights are written."""
    import torch

    from src.errors import UserInputError

    class Diverge(pl.Callback):  # what an exploding learning rate does to the weights
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                with torch.no_grad():
                    pl_module.model.head.weight.fill_(float("nan"))

    proj_dir = tmp_path / "out"
    with pytest.raises(UserInputError) as stopped:
        train.train(parse_args([*TINY_RUN, "--proj_dir", str(proj_dir)]), [Diverge()])
    message = str(stopped.value)
    assert "\n" not in message and "the training loss became nan in mini-epoch 0" in message, message
    assert "--lr_init" in message
    assert not (proj_dir / "rwkv-0.pth").exists() and (proj_dir / "rwkv-init.pth").exists()
