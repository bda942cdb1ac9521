"""One run per --proj_dir: a lock file that the running train.py holds, so that a second run into the same folder
is refused instead of replacing the first one's checkpoints and interleaving its logs.

The lock, --proj_dir/rwkv-run.lock, is created atomically and whole (written under a private name, then
hard-linked into place: of two runs starting together, one creates it and the other finds it complete) and names
its owner: pid, host, start time, command line. The owner removes it when it ends: normally, on a refusal or an
error, on Ctrl+C / SIGTERM, and at a hard exit (a second Ctrl+C). A lock left by a process that died without
removing it (killed, out of memory, power cut) is recognised on the same host, where no process has its pid any
more, and taken over with a note. A lock from another host cannot be judged from here: it is refused, with the
file to delete if that run is gone.

No torch import.
"""
import contextlib
import datetime
import json
import os
import socket
import stat
import sys
from pathlib import Path

from src import cli
from src.io.atomic import discard, temporary_path
from src.errors import UserInputError

LOCK_NAME = "rwkv-run.lock"
_COMMAND_SHOWN = 120  # characters of the owner's command line in a refusal
_LOCK_BYTES = 1 << 16  # the most of a lock file read: a record is a few hundred bytes (the command line's length)
# what a lock looks like while it is written where the filesystem has no hard links (_create_whole)
_MAYBE_BEING_WRITTEN = ("it is empty", "it is not a JSON record")
_PID_MAX = 2 ** 31 - 1  # process ids are C ints (Linux's pid_max is at most 2^22)

# The locks this process holds -> the folders it created to hold them (removed again at release if left empty).
_HELD: dict = {}


@contextlib.contextmanager
def proj_dir_lock(proj_dir):
    """Hold the lock of --proj_dir `proj_dir` (the folder is created when missing) for the block."""
    path = acquire(proj_dir)
    try:
        yield path
    finally:
        release(path)


def acquire(proj_dir) -> Path:
    """Take the lock of `proj_dir`, or refuse in one line naming the run that holds it."""
    folder = Path(proj_dir)
    path = folder / LOCK_NAME
    created = []
    try:
        created = _make_folders(folder)
        for _ in range(3):  # a stale lock removed, then taken by a run that started at the same moment: refused
            if _create_whole(path, json.dumps(_this_run())):
                _HELD[path] = created
                return path
            _remove_if_stale(path)
        raise _in_use(path, _owner(path))
    except OSError as e:
        raise UserInputError(f"--proj_dir {folder}: cannot create the lock file {path} ({e.strerror})")
    finally:
        if path not in _HELD:
            _remove_empty(created)


def release(path: Path) -> None:
    """Remove a lock this process holds, and the folders it created for it if nothing else was written there."""
    if path not in _HELD:
        return
    created = _HELD.pop(path)
    path.unlink(missing_ok=True)
    _remove_empty(created)


def release_all() -> None:  # registered below with cli.at_the_end
    """Remove every lock this process holds (when a command ends, and just before a hard exit, which runs no
    `finally`)."""
    for path in list(_HELD):
        release(path)


def _create_whole(path: Path, text: str) -> bool:
    """Create the file `path` holding `text` unless `path` exists (then False). Another run never sees it empty or
    half-written: the text goes to this process's temporary file beside it, which is then hard-linked to `path` (a
    link fails when the name exists, as O_EXCL does; atomic.publish without replace works the same way). Where the
    filesystem has no hard links, `path` is created with O_EXCL and written: a run that reads it in that instant is
    refused as by a damaged lock."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (any other trouble recurs below, and is reported)
        pass
    finally:
        discard(tmp)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:  # a full disk, a signal: no half-written lock is left behind
        path.unlink(missing_ok=True)
        raise
    return True


def _this_run() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"), "command": " ".join(sys.argv)}


def _owner(path: Path):
    """The owner record of a lock file; {"damaged": why} when it is unreadable (being written this instant, or
    damaged); None when it has gone. A lock that is not a regular file (a folder, a pipe) is refused here."""
    try:
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise _not_a_lock_file(path, mode)
        with open(path, "rb") as f:
            data = f.read(_LOCK_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"damaged": f"it cannot be read: {e.strerror}"}
    if len(data) > _LOCK_BYTES:
        return {"damaged": f"it is larger than {_LOCK_BYTES} bytes, which no lock record is"}
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {"damaged": _MAYBE_BEING_WRITTEN[0] if not data.strip() else _MAYBE_BEING_WRITTEN[1]}
    problem = _record_problem(record)
    return {"damaged": problem} if problem else record


def _record_problem(record) -> str:
    """What is wrong with a lock record as read, or "" when it is whole: a JSON object with a process id in the
    range of process ids and text for host, start time and command."""
    if not isinstance(record, dict) or "damaged" in record:
        return "it is not a JSON object with the keys of a lock record"
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= _PID_MAX:
        return f"its pid {str(pid)[:40]} is not a process id"
    wrong = [key for key in ("host", "started", "command") if not isinstance(record.get(key, ""), str)]
    if not isinstance(record.get("host"), str) or wrong:
        return f"its {(wrong or ['host'])[0]} is not text"
    return ""


def _not_a_lock_file(path: Path, mode: int) -> UserInputError:
    what = ("a folder" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a special file")
    return UserInputError(f"--proj_dir {path.parent}: {path} is {what}, not the lock file of a run (this toolkit "
                          f"writes it as a small file); move it out of the folder, or choose another --proj_dir")


def _remove_if_stale(path: Path) -> None:
    """Remove the lock of a process that no longer runs on this host (with a note); refuse any other lock."""
    owner = _owner(path)
    if owner is None:
        return  # its run ended meanwhile: try again
    if not _owner_is_gone(path, owner):
        raise _in_use(path, owner)
    if _owner(path) == owner:  # not taken over meanwhile by a run that started at the same moment
        path.unlink(missing_ok=True)
        print(f"Note: {path} was left by pid {owner['pid']} (started {owner.get('started')}), which no longer "
              f"runs; this run takes the folder over.", file=sys.stderr, flush=True)


def _owner_is_gone(path: Path, owner: dict) -> bool:
    """True only when it is certain: the owner was on this host and no process has its pid (or this process has
    it, without holding the lock: the pid was reused)."""
    if "damaged" in owner or owner.get("host") != socket.gethostname():
        return False
    if owner["pid"] == os.getpid():
        return path not in _HELD
    try:
        os.kill(owner["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # it exists, under another user; or a pid this system cannot hold: not judged
    return False


def _in_use(path: Path, owner) -> UserInputError:
    folder = path.parent
    owner = owner or {"damaged": "it was removed and created again by runs starting at the same time"}
    if "damaged" in owner:
        now = "; a run starting this instant may be writing it" if owner["damaged"] in _MAYBE_BEING_WRITTEN else ""
        return UserInputError(f"--proj_dir {folder} is locked, but its lock file {path} cannot be read "
                              f"({owner['damaged']}{now}); if no run uses this folder, delete {path}")
    command = owner.get("command", "")
    if len(command) > _COMMAND_SHOWN:
        command = command[:_COMMAND_SHOWN] + "..."
    run = f"pid {owner['pid']} on {owner.get('host')}, started {owner.get('started')}: {command}"
    if owner.get("host") == socket.gethostname():
        return UserInputError(f"--proj_dir {folder} is in use by another run ({run}); wait for it to end, stop it, "
                              f"or choose another --proj_dir")
    return UserInputError(f"--proj_dir {folder} is in use by a run on another host ({run}); this host cannot tell "
                          f"whether it still runs: if it has ended, delete {path}, or choose another --proj_dir")


def _make_folders(folder: Path) -> list:
    """Create `folder` and its missing parents; returns the ones created, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list) -> None:
    """Remove the folders a lock created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


cli.at_the_end(release_all)
