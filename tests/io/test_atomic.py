"""Output paths checked before any work (check_output_file, check_can_create), and a full disk during an atomic
write: one line naming the folder and the space needed, the earlier file whole, no temporary file left."""
import errno
import os

import pytest
import torch

from helpers import full_disk_after
from src.io import atomic
from src.io.atomic import atomic_file, check_can_create, check_output_file
from src.io.checkpoint import load_weights, save_weights
from src.errors import UserInputError


def test_an_existing_output_needs_the_replace_flag(tmp_path):
    out = tmp_path / "merged.pth"
    out.write_bytes(b"earlier work")
    with pytest.raises(UserInputError, match=f"the output {out} already exists; choose another name, or pass "
                                             f"--overwrite to replace it"):
        check_output_file(out, replace=False, what="the output")
    check_output_file(out, replace=True, what="the output")
    assert out.read_bytes() == b"earlier work"


@pytest.mark.parametrize("make, message", [
    (lambda tmp: (tmp / "dir.pth").mkdir() or tmp / "dir.pth", "is a folder; give a file name"),
    (lambda tmp: (tmp / "file").write_bytes(b"x") and tmp / "file" / "sub" / "out.pth", "is a file, not a folder"),
    (lambda tmp: "/proc/rwkv-infctx-test/out.pth", r"cannot create files in /proc \("),
])
def test_an_output_that_cannot_be_written_is_refused_and_nothing_is_created(tmp_path, make, message):
    path = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserInputError, match=message):
        check_output_file(path, replace=True, what="the output")
    assert sorted(tmp_path.rglob("*")) == before


def test_the_folder_probe_creates_nothing(tmp_path):
    check_can_create(tmp_path / "a" / "b", "--proj_dir x")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_the_earlier_file_stays_whole(tmp_path, monkeypatch):
    path = tmp_path / "rwkv-1.pth"
    save_weights({"w": torch.ones(1000)}, path)
    earlier = path.read_bytes()
    monkeypatch.setattr(atomic, "_write", full_disk_after(100))  # torch.save writes far more than that
    with pytest.raises(UserInputError) as refused:
        save_weights({"w": torch.zeros(1000)}, path)
    message = str(refused.value)
    assert message.startswith(f"no space left on the device of {tmp_path} for rwkv-1.pth (about 4 kB needed, ")
    assert "free); make room there or choose another folder. Files written before are whole." in message
    assert path.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["rwkv-1.pth"]
    monkeypatch.undo()
    assert torch.equal(load_weights(path)["w"], torch.ones(1000))


def test_a_full_disk_found_at_fsync_is_the_same_line(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserInputError, match=r"no space left on the device of .* for vocab.json \(about 5 bytes"):
        with atomic_file(tmp_path / "vocab.json", size=5) as f:
            f.write(b"12345")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def write(file, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic, "_write", write)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_file(tmp_path / "x.bin") as f:
            f.write(b"data")
    assert list(tmp_path.iterdir()) == []


def test_each_process_writes_its_own_temporary_file_except_into_a_shared_folder(tmp_path):
    """Two commands writing the same output at once never write into one temporary file; the ranks of a run that
    write one folder together (the DeepSpeed resume bundle) share its name."""
    own, shared = atomic.temporary_path(tmp_path / "out.pth"), atomic.temporary_path(tmp_path / "b", shared=True)
    assert own.name == f".out.pth.{os.getpid()}.partial" and shared.name == ".b.partial"
    atomic.discard(own)
    atomic.discard(shared)


def test_without_replace_an_output_that_appeared_meanwhile_is_kept(tmp_path):
    """As when another command wrote the same output while this one ran."""
    path = tmp_path / "merged.pth"
    with pytest.raises(UserInputError, match=f"{path} was written by another command while this one ran; it is left "
                                             f"as it is, and this command's output was discarded"):
        with atomic_file(path, replace=False) as f:
            f.write(b"this command's")
            path.write_bytes(b"the other command's")
    assert [p.name for p in tmp_path.iterdir()] == ["merged.pth"] and path.read_bytes() == b"the other command's"
    with atomic_file(tmp_path / "new.pth", replace=False) as f:
        f.write(b"new")
    assert (tmp_path / "new.pth").read_bytes() == b"new"


def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.txt").write_text("input")
    os.link(tmp_path / "in" / "data.txt", tmp_path / "alias.txt")
    inputs = [("--data", tmp_path / "in" / "data.txt"), ("--folder", tmp_path / "in")]
    for path, folder, message in [(tmp_path / "in" / "data.txt", False, "is --data"),
                                  (tmp_path / "alias.txt", False, "is --data"),  # the same file by a hard link
                                  (tmp_path / "in" / "new.txt", False, "lies inside --folder"),
                                  (tmp_path, True, "holds --data")]:
        with pytest.raises(UserInputError, match=message):
            atomic.check_apart(path, "OUT", inputs, folder=folder)
    atomic.check_apart(tmp_path / "out.txt", "OUT", inputs)


@pytest.mark.parametrize("existing", [False, True])
def test_a_folder_replaces_only_what_the_check_found(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    found = atomic.check_output_folder(out, replace=True, what="OUT_DIR")
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        atomic.publish(tmp, out, replace=found)
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
    # the same again, while another command writes into the folder: refused, its file and the old folder kept
    found = atomic.check_output_folder(out, replace=True, what="OUT_DIR")
    with pytest.raises(UserInputError, match="was written by another command while this one ran"):
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            (out / "theirs.txt").write_text("theirs")
            atomic.publish(tmp, out, replace=found)
    assert sorted(os.listdir(out)) == ["new.txt", "theirs.txt"] and os.listdir(tmp_path) == ["out"]


def test_a_hard_exit_puts_back_a_folder_moved_aside(tmp_path):
    """Between moving the old folder aside and renaming the new one into place, a hard exit restores the old."""
    out, aside = tmp_path / "out", tmp_path / ".out.old"
    out.mkdir()
    (out / "old.txt").write_text("old")
    os.rename(out, aside)
    atomic._ASIDE[aside] = out
    atomic.remove_partial_files()
    assert os.listdir(tmp_path) == ["out"] and (out / "old.txt").read_text() == "old" and not atomic._ASIDE


def test_a_full_disk_of_unknown_size_names_what_was_given(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_write", full_disk_after(100))
    with pytest.raises(UserInputError, match=r"for x.bin \(more than 550 bytes needed, .* free\)"):
        with atomic_file(tmp_path / "x.bin") as f:
            f.write(b"a" * 50)
            f.write(b"b" * 500)
    assert list(tmp_path.iterdir()) == []
