"""--accumulate_grad_batches_dict: the schedule's arithmetic, the LR schedule over it, and runs that change it."""
import signal

import numpy as np
import pytest
import torch

import train
from src.io import outputs
from src.train import stopping
from src.accumulation import accumulation_at, lightning_schedule, optimizer_steps_before, optimizer_steps_in_epoch
from src.train.callbacks import learning_rate, real_step
from src.io.checkpoint import load_weights
from src.config import parse_args
from src.data.dataset import TokenData, TrainingSamples
from src.errors import UserInputError


def config(*extra):
    return parse_args(["--data_type", "dummy", "--epoch_steps", "8", "--epoch_count", "3", *extra])


def test_accumulation_and_optimizer_steps_by_mini_epoch():
    cfg = config("--accumulate_grad_batches_dict", "{0: 1, 1: 2}")
    assert [accumulation_at(cfg, e) for e in range(4)] == [1, 2, 2, 2]
    assert [optimizer_steps_in_epoch(cfg, e) for e in range(3)] == [8, 4, 4]
    assert [optimizer_steps_before(cfg, e) for e in range(5)] == [0, 8, 12, 16, 20]
    # --accumulate_grad_batches holds before the first key; 8 micro-batches in steps of 3 are 3 steps (3 + 3 + 2)
    later = config("--accumulate_grad_batches", "3", "--accumulate_grad_batches_dict", "{2: 1, 5: 4}")
    assert [accumulation_at(later, e) for e in (0, 1, 2, 4, 5, 9)] == [3, 3, 1, 1, 4, 4]
    assert [optimizer_steps_before(later, e) for e in (0, 1, 2, 3, 5, 6)] == [0, 3, 6, 14, 30, 32]
    constant = config("--accumulate_grad_batches", "3")
    assert [optimizer_steps_before(constant, e) for e in range(4)] == [0, 3, 6, 9]


def test_lightning_epochs_count_from_epoch_begin():
    schedule = ["--epoch_count", "10", "--accumulate_grad_batches_dict", "{0: 1, 4: 2, 6: 8}"]
    assert lightning_schedule(config(*schedule)) == {0: 1, 4: 2, 6: 8}
    assert lightning_schedule(config(*schedule, "--epoch_begin", "5")) == {0: 2, 1: 8}
    assert lightning_schedule(config(*schedule, "--epoch_begin", "7")) == {0: 8}


def test_lr_schedule_and_previous_steps_follow_the_schedule():
    cfg = config("--accumulate_grad_batches_dict", "{0: 1, 1: 2}", "--lr_init", "1e-3", "--lr_final", "1e-5")
    assert learning_rate(15, cfg) == pytest.approx(1e-5)  # 8 + 4 + 4 steps: the decay ends at step 15
    assert learning_rate(14, cfg) > 1e-5
    assert learning_rate(7, cfg) == pytest.approx(1e-3 * 1e-2 ** (8 / 16))  # halfway through the 16 steps
    resumed = config("--accumulate_grad_batches_dict", "{0: 1, 1: 2}", "--lr_init", "1e-3", "--lr_final", "1e-5",
                     "--epoch_begin", "2")
    assert real_step(0, resumed) == 12 and learning_rate(3, resumed) == pytest.approx(learning_rate(15, cfg))


def test_context_warmup_counts_the_steps_of_each_mini_epoch():
    cfg = parse_args(["--data_type", "dummy", "--ctx_len", "40", "--initial_ctx_len", "4", "--ctx_warmup_steps",
                      "9", "--micro_bsz", "2", "--epoch_steps", "4", "--accumulate_grad_batches_dict", "{1: 2}"])
    samples = TrainingSamples(TokenData(np.arange(100, dtype=np.uint16), "test", 100), cfg, seed=0, rank=0)
    # 8 samples per mini-epoch: 4 steps of 1 micro-batch, then 2 steps of 2 micro-batches
    assert [samples.step_of(i) for i in range(0, 16, 2)] == [0, 1, 2, 3, 4, 4, 5, 5]
    assert [len(samples[i][0]) for i in (0, 6, 8, 12)] == [4, 16, 20, 24]
    later = parse_args(["--data_type", "dummy", "--micro_bsz", "2", "--epoch_steps", "4", "--epoch_begin", "1",
                        "--accumulate_grad_batches_dict", "{1: 2}"])
    samples = TrainingSamples(TokenData(np.arange(100), "t", 100), later, 0, 0)
    assert [samples.step_of(i) for i in (0, 4, 8)] == [0, 1, 2]


@pytest.mark.parametrize("value", ["{0: 0}", "{-1: 2}", "{'a': 2}", "{0: 1.5}", "[1, 2]", "{}", "{0: True}", "4",
                                   "{0: 1", "__import__('os')"])
def test_bad_schedules_are_refused_in_one_line(value, capsys):
    assert train.main(["--data_type", "dummy", "--accumulate_grad_batches_dict", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--accumulate_grad_batches_dict" in err and "{0: 1, 4: 2}" in err


def test_schedule_is_refused_with_deepspeed():
    with pytest.raises(UserInputError, match="DeepSpeed cannot"):
        config("--accumulate_grad_batches_dict", "{1: 2}", "--strategy", "deepspeed_stage_2")


# ---- through train.main: 8 optimizer steps in mini-epoch 0, then 4 in mini-epoch 1

RUN = ["--data_type", "dummy", "--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2",
       "--epoch_steps", "8", "--epoch_count", "2", "--epoch_save", "1", "--accumulate_grad_batches_dict",
       "{0: 1, 1: 2}", "--lr_init", "2e-3", "--lr_final", "5e-4", "--random_seed", "3", "--wkv_backend", "torch",
       "--enable_progress_bar", "0"]


def step_rows(proj_dir):
    return [row.split("\t") for row in (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    proj_dir = tmp_path_factory.mktemp("straight")
    assert train.main([*RUN, "--proj_dir", str(proj_dir)]) == 0
    return proj_dir


def test_a_run_takes_the_scheduled_steps_per_mini_epoch(straight_run):
    rows = step_rows(straight_run)
    assert [int(row[0]) for row in rows] == list(range(1, 13))
    assert [int(row[1]) for row in rows] == [0] * 8 + [1] * 4
    assert float(rows[-1][3]) == pytest.approx(5e-4)  # the LR decay ends with the last of the 12 steps
    assert float(rows[-1][5]) == 16 * 2 * 16 / 1e9  # every micro-batch's tokens counted


@pytest.mark.parametrize("stop_after", [3, 10])  # before the change, and half-way through the accumulating epoch
def test_resume_is_exact_across_the_change(straight_run, tmp_path, monkeypatch, stop_after):
    proj_dir = tmp_path / "out"
    agreed = stopping.StopAgreement.signal
    # a Ctrl+C that every rank agrees on right after optimizer step `stop_after`
    monkeypatch.setattr(stopping.StopAgreement, "signal", lambda self, trainer, signum: agreed(
        self, trainer, signal.SIGINT if trainer.global_step == stop_after else signum))
    assert train.main([*RUN, "--proj_dir", str(proj_dir)]) == 130
    assert len(step_rows(proj_dir)) == stop_after
    monkeypatch.undo()
    assert train.main([*RUN, "--proj_dir", str(proj_dir), "--resume", str(proj_dir / outputs.BUNDLE_NAME)]) == 0
    assert [row[:4] for row in step_rows(proj_dir)] == [row[:4] for row in step_rows(straight_run)]
    resumed, straight = load_weights(proj_dir / "rwkv-final.pth"), load_weights(straight_run / "rwkv-final.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
