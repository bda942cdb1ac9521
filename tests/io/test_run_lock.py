"""One run per --proj_dir: a second run into a running run's folder is refused in one line naming that run (and the
first one finishes whole); the lock goes when its run ends, however it ends; a lock left by a dead process on this
host is taken over, one from another host is refused with the file to delete."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from conftest import ROOT, TINY_RUN
from helpers import folder_snapshot, refused_in_one_line
from src.io import run_lock
from src.errors import UserInputError
from src.io.run_lock import LOCK_NAME

def write_lock(folder, **owner):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": 1, "host": socket.gethostname(), "started": "2026-01-02 03:04:05", "command": "train.py ..."}
    (folder / LOCK_NAME).write_text(json.dumps({**record, **owner}))
    return folder / LOCK_NAME


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped: no process has that pid now)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_second_run_is_refused_while_the_first_runs_and_the_first_finishes_whole(tmp_path, capsys,
                                                                                     finished_run):
    """The first run is held still (SIGSTOP) once it owns the folder, before it writes anything of its own; meanwhile
    a fresh run and a fine-tune (--load_model) try the same --proj_dir."""
    proj_dir = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "train.py", *TINY_RUN, "--proj_dir", str(proj_dir)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (proj_dir / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        for extra in ([], ["--load_model", str(finished_run / "rwkv-final.pth"), "--epoch_count", "3"]):
            refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), *extra], capsys,
                                f"--proj_dir {proj_dir} is in use by another run (pid {first.pid} on "
                                f"{socket.gethostname()}, started ", "train.py", "wait for it to end")
        os.kill(first.pid, signal.SIGCONT)
        output, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, output
    written, expected = folder_snapshot(proj_dir), folder_snapshot(finished_run)
    assert sorted(written) == sorted(expected)
    logs = ("train_log.txt", "train_steps.tsv")  # they hold times
    assert all(written[name] == expected[name] for name in expected if name not in logs)  # the same weights
    assert [row.split("\t")[:6] for row in (proj_dir / logs[1]).read_text().splitlines()] == \
           [row.split("\t")[:6] for row in (finished_run / logs[1]).read_text().splitlines()]
    assert (proj_dir / logs[0]).read_text().count("NEW RUN") == 1  # no second run's lines in between


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, capfd):
    proj_dir = tmp_path / "out"
    pid = dead_pid()
    write_lock(proj_dir, pid=pid)
    assert train.main([*TINY_RUN, "--proj_dir", str(proj_dir)]) == 0
    err = capfd.readouterr().err
    assert f"Note: {proj_dir / LOCK_NAME} was left by pid {pid} (started 2026-01-02 03:04:05), which no longer " \
           f"runs; this run takes the folder over." in err
    assert not (proj_dir / LOCK_NAME).exists() and (proj_dir / "rwkv-final.pth").is_file()


@pytest.mark.parametrize("owner, expected", [
    ({"host": "other-machine"}, ["is in use by a run on another host (pid 1 on other-machine, started 2026-01-02 "
                                 "03:04:05: train.py ...)", "if it has ended, delete"]),
    ({"pid": "garbage"}, ["is locked, but its lock file", "cannot be read (its pid garbage is not a process id)",
                          "if no run uses this folder, delete"]),
])
def test_a_lock_that_cannot_be_judged_from_here_is_refused(finished_copy, capsys, owner, expected):
    lock = write_lock(finished_copy, **owner)
    before = folder_snapshot(finished_copy)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(finished_copy), "--overwrite_proj_dir", "1"], capsys,
                        *expected, str(lock))
    assert folder_snapshot(finished_copy) == before


def test_a_refused_run_removes_its_lock_and_the_folders_it_created(tmp_path, capsys):
    proj_dir = tmp_path / "new" / "out"
    (tmp_path / "junk.pth").write_bytes(b"not a model")
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), "--load_model", str(tmp_path / "junk.pth")],
                        capsys, "junk.pth is not a PyTorch file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth"]


def test_one_process_holds_a_folder_once(tmp_path):
    with run_lock.proj_dir_lock(tmp_path):
        with pytest.raises(UserInputError, match="is in use by another run \\(pid \\d+ on "):
            run_lock.acquire(tmp_path)
        assert (tmp_path / LOCK_NAME).is_file()
    assert not (tmp_path / LOCK_NAME).exists()
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("hard_links", [True, False])
def test_the_lock_appears_whole_and_alone(tmp_path, monkeypatch, hard_links):
    """The lock holds its owner's record from the moment it exists: the name appears by a hard link to a file
    already written whole. No private file is left beside it. Where the filesystem refuses hard links (FAT, some
    network mounts), the lock is created in place instead."""
    linked = []

    def link(src, dst):
        assert json.loads(Path(src).read_text())["pid"] == os.getpid()  # whole before the name can appear
        if not hard_links:
            raise OSError(errno.EPERM, "Operation not permitted")
        real_link(src, dst)  # FileExistsError when the lock exists: the second acquire below
        linked.append(dst)

    real_link = os.link
    monkeypatch.setattr(run_lock.os, "link", link)
    with run_lock.proj_dir_lock(tmp_path):
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(UserInputError, match="is in use by another run"):
            run_lock.acquire(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    assert list(tmp_path.iterdir()) == []
    assert linked == ([tmp_path / LOCK_NAME] if hard_links else [])
