"""What a person reads: one line per mini-epoch off a terminal, the end summary, no library chatter."""
import logging
import os
import re
import sys
import warnings

import pytest

import train
from src.config import parse_args
from src.train.console import shows_progress_bar

TINY = ["--data_type", "dummy", "--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2",
        "--epoch_steps", "3", "--epoch_count", "2", "--wkv_backend", "torch", "--random_seed", "1"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("progress_bar", ["1", "0"])
def test_off_a_terminal_each_mini_epoch_is_one_line_and_the_run_ends_with_a_summary(tmp_path, capfd, progress_bar):
    lightning_log = Records()
    logging.getLogger("lightning.pytorch").addHandler(lightning_log)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert train.main([*TINY, "--proj_dir", str(tmp_path), "--enable_progress_bar", progress_bar]) == 0
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(lightning_log)
    out, err = capfd.readouterr()
    assert "\r" not in out + err  # no progress bar redraws in a log file
    epoch_lines = [line for line in out.splitlines() if re.match(r"mini-epoch \d+:", line)]
    assert len(epoch_lines) == 2, out
    for number, line in enumerate(epoch_lines):
        assert re.fullmatch(rf"mini-epoch {number}: loss \d+\.\d{{4}}, lr \S+, \d+\.\d\d kt/s, ctx_len 16, \d+\.\d s",
                            line), line
    logged_loss = float((tmp_path / "train_log.txt").read_text().splitlines()[-1].split()[1])
    finished, saved = out.splitlines()[-2:]
    assert re.fullmatch(rf"Finished: trained {2 * 3 * 2 * 16} tokens in \d+\.\d s, [\d,]+ tokens/s after the first "
                        rf"optimizer step; last mini-epoch's mean loss {logged_loss:.4f}\.", finished), finished
    assert saved == (f"Saved in {tmp_path}/: rwkv-init.pth, rwkv-0.pth, rwkv-1.pth, rwkv-final.pth (log: "
                     f"train_log.txt, train_steps.tsv)")
    assert err == ""
    assert lightning_log.messages == []  # "GPU available", "Tip: ... litlogger", "`Trainer.fit` stopped"
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def test_the_progress_bar_is_for_terminals_only(tmp_path, monkeypatch):
    cfg = parse_args(["--data_type", "dummy"])
    disabled = parse_args(["--data_type", "dummy", "--enable_progress_bar", "0"])
    leader, follower = os.openpty()
    with open(follower, "w") as terminal, open(tmp_path / "log.txt", "w") as log_file:
        monkeypatch.setattr(sys, "stdout", terminal)
        assert shows_progress_bar(cfg.enable_progress_bar)
        assert not shows_progress_bar(disabled.enable_progress_bar)
        monkeypatch.setattr(sys, "stdout", log_file)
        assert not shows_progress_bar(cfg.enable_progress_bar)
    os.close(leader)
