"""LR schedule: warm-up and decay endpoints, in optimizer steps."""
import math

import pytest

from src.callbacks import learning_rate
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
    import train

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
