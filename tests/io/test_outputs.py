"""Which files a run writes into --proj_dir, and the runs that may write where files already are; a full disk."""
import errno
import os

import pytest
import torch

import train
from conftest import TINY_RUN
from helpers import folder_snapshot, refused_in_one_line
from src.io import atomic
from src.io.checkpoint import load_weights
from src.config import parse_args
from src.io.outputs import RunFiles, files_written

STOP_FILES = ["rwkv-last.pth", "rwkv-resume.ckpt"]


def run_files(argv: list) -> RunFiles:
    return RunFiles.from_flags(parse_args(argv))


def test_files_written_follow_the_saving_rules():
    fresh = run_files(["--data_type", "dummy", "--epoch_count", "7", "--epoch_save", "3"])
    assert files_written(fresh) == ["rwkv-init.pth", "rwkv-0.pth", "rwkv-3.pth", "rwkv-6.pth", "rwkv-final.pth",
                                    *STOP_FILES]
    continued = run_files(["--data_type", "dummy", "--load_model", "out/rwkv-3.pth", "--epoch_begin", "4",
                           "--epoch_count", "10", "--max_epochs", "2", "--epoch_save", "1"])
    assert files_written(continued) == ["rwkv-4.pth", "rwkv-5.pth", *STOP_FILES]  # capped: no rwkv-final.pth
    capped = run_files(["--data_type", "dummy", "--epoch_count", "10", "--max_epochs", "3", "--epoch_save", "0"])
    assert files_written(capped) == ["rwkv-init.pth", "rwkv-2.pth", *STOP_FILES]  # the run's last mini-epoch


def test_a_run_capped_by_max_epochs_saves_its_last_mini_epoch(tmp_path):
    proj_dir = tmp_path / "out"
    assert train.main([*TINY_RUN, "--epoch_count", "5", "--max_epochs", "2", "--epoch_save", "0",
                       "--proj_dir", str(proj_dir)]) == 0
    assert sorted(p.name for p in proj_dir.glob("*.pth")) == ["rwkv-1.pth", "rwkv-init.pth"]
    resumed = run_files(["--data_type", "dummy", "--resume", "out/rwkv-resume.ckpt", "--epoch_count", "4",
                         "--epoch_save", "1"])
    assert files_written(resumed, first_epoch=2) == ["rwkv-2.pth", "rwkv-3.pth", "rwkv-final.pth", *STOP_FILES]


@pytest.fixture
def out(finished_copy):
    return finished_copy


def test_overwrite_proj_dir_replaces_the_earlier_runs_files(out):
    first = load_weights(out / "rwkv-final.pth")
    assert train.main([*TINY_RUN, "--proj_dir", str(out), "--overwrite_proj_dir", "1", "--random_seed", "2"]) == 0
    second = load_weights(out / "rwkv-final.pth")
    assert not torch.equal(first["emb.weight"], second["emb.weight"])  # a new run's weights, seed 2
    assert (out / "train_log.txt").read_text().count("NEW RUN") == 2  # the log is appended to


def test_continuing_by_hand_in_the_same_proj_dir(out):
    """--load_model out/rwkv-1.pth --epoch_begin 2: rwkv-0/1.pth stay; rwkv-final.pth moves on (rwkv-1.pth keeps
    the weights it had)."""
    earlier = {name: data for name, data in folder_snapshot(out).items() if name in ("rwkv-0.pth", "rwkv-1.pth")}
    assert torch.equal(load_weights(out / "rwkv-final.pth")["head.weight"],
                       load_weights(out / "rwkv-1.pth")["head.weight"])
    assert train.main([*TINY_RUN, "--proj_dir", str(out), "--load_model", str(out / "rwkv-1.pth"), "--epoch_begin", "2",
                       "--epoch_count", "4"]) == 0
    after = folder_snapshot(out)
    assert {name: after[name] for name in earlier} == earlier
    assert torch.equal(load_weights(out / "rwkv-final.pth")["head.weight"],
                       load_weights(out / "rwkv-3.pth")["head.weight"])


def test_a_full_disk_during_a_save_is_one_line_and_every_earlier_file_stays_whole(out, capsys, monkeypatch):
    """A hand continuation saves rwkv-2.pth, then the disk is full when rwkv-3.pth is written."""
    earlier = folder_snapshot(out)

    def full_at_rwkv_3(file, data):
        if os.path.basename(file.name).startswith(".rwkv-3.pth."):  # its temporary file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return file.write(data)

    monkeypatch.setattr(atomic, "_write", full_at_rwkv_3)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(out), "--load_model", str(out / "rwkv-1.pth"), "--epoch_begin",
                         "2", "--epoch_count", "4"], capsys,
                        f"no space left on the device of {out} for rwkv-3.pth (about ", " kB needed, ",
                        "free); make room there or choose another folder. Files written before are whole.")
    after = folder_snapshot(out)
    assert {name: after[name] for name in earlier if not name.endswith((".txt", ".tsv"))} == \
           {name: data for name, data in earlier.items() if not name.endswith((".txt", ".tsv"))}
    assert sorted(set(after) - set(earlier)) == ["rwkv-2.pth"]  # no partial file, no lock left
    load_weights(out / "rwkv-2.pth")
