"""Every file and folder the toolkit writes appears whole or not at all: written under a temporary name beside
its final path, then renamed over it. A hard exit (a second Ctrl+C) deletes the temporary names in flight.

    with atomic_path("out/rwkv-3.pth") as tmp:   # tmp = out/.rwkv-3.pth.<pid>.partial
        write(tmp); fsync; publish(tmp, "out/rwkv-3.pth")

Writers whose files live longer than one block (the binidx builder) take `temporary_path` and end with
`publish` or `discard`.
"""
import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from src.errors import UserInputError

# Temporary files and folders being written right now.
_IN_FLIGHT: set = set()
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def check_output_file(path, replace: bool, what: str, replace_flag: str = "--overwrite") -> None:
    """Before any work: refuse an output file that cannot be written (a folder, under a file, in a folder that
    refuses new files) or that already exists and `replace` is False. `what` names the output in the message
    ("the output", "--output-prefix data/x"); `replace_flag` is the flag that allows replacing. Nothing is
    created (see check_can_create)."""
    path = Path(path)
    try:  # is_dir() itself raises under a folder that may not be searched
        if path.is_dir():
            raise UserInputError(f"{what} {path} is a folder; give a file name.")
        exists = path.exists()
    except OSError as e:
        raise UserInputError(f"{what} {path}: cannot look at it ({e.strerror}); choose a folder you can write to.")
    if exists and not replace:
        raise UserInputError(f"{what} {path} already exists; choose another name, or pass {replace_flag} to "
                             f"replace it.")
    check_can_create(path.parent, f"{what} {path}")


def check_can_create(folder, what: str) -> None:
    """Refuse a folder where no file can be created: it lies under a file, or its nearest existing folder refuses
    new files (read-only, /proc, no permission). That folder is probed with a temporary file that deletes itself:
    no folder is created, nothing is left. `what` starts the message ("--proj_dir out")."""
    folder = Path(folder)
    try:  # exists() itself raises under a folder that may not be searched
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UserInputError(f"{what}: {folder} is a file, not a folder; choose another path.")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserInputError(f"{what}: cannot create files in {folder} ({e.strerror}); choose a folder you can "
                             f"write to.")


def is_disk_full(error) -> bool:
    """Whether `error` is a write refused for lack of space (a full disk or an exhausted quota)."""
    return isinstance(error, OSError) and error.errno in _NO_SPACE


def disk_full_error(path, needed_bytes: int, lower_bound: bool = False) -> UserInputError:
    """The one line for a write that ran out of space: the folder, what `path` needs (`needed_bytes`, or more than
    that with `lower_bound`) and what is free. The temporary file is deleted, so earlier files are whole."""
    path = Path(path)
    try:
        free = f", {_size_text(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    needed = f"{'more than' if lower_bound else 'about'} {_size_text(needed_bytes)} needed"
    return UserInputError(f"no space left on the device of {path.parent} for {path.name} ({needed}{free}); make "
                          f"room there or choose another folder. Files written before are whole.")


def _size_text(n_bytes: float) -> str:
    """1234567 -> "1.23 MB"."""
    if n_bytes < 1000:
        return f"{n_bytes:.0f} bytes"
    for unit in ("kB", "MB", "GB"):
        n_bytes /= 1000
        if n_bytes < 999.5:  # what rounds to 1000 reads better as 1 of the next unit
            return f"{n_bytes:.3g} {unit}"
    return f"{n_bytes:,.0f} GB"


def temporary_path(path, shared: bool = False) -> Path:
    """The temporary name beside `path`, this process's own: two commands writing the same output never write into
    one file. `shared`: the same name in every process, for a folder that the ranks of a run write together."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = "" if shared else f".{os.getpid()}"
    tmp = path.with_name(f".{path.name}{owner}.partial")
    _IN_FLIGHT.add(tmp)
    return tmp


def publish(tmp: Path, path, replace: bool = True) -> None:
    """Move a finished temporary file or folder over `path` (an old folder is swapped out, then removed). Without
    `replace`, a file that appeared at `path` meanwhile (another command writing the same output) stays, and this
    one is discarded with one line."""
    path = Path(path)
    if not replace:
        _publish_new_file(tmp, path)
    elif tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        remove_path(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)
    _IN_FLIGHT.discard(tmp)


def _publish_new_file(tmp: Path, path: Path) -> None:
    """A hard link fails if `path` exists, in the same atomic step that creates it (a rename would replace it)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        _refuse_a_newcomer(tmp, path)
    except OSError:  # a file system without hard links: there the check and the rename are two steps
        if path.exists():
            _refuse_a_newcomer(tmp, path)
        os.replace(tmp, path)
    else:
        os.unlink(tmp)
    _IN_FLIGHT.discard(tmp)


def _refuse_a_newcomer(tmp: Path, path: Path) -> None:
    discard(tmp)
    raise UserInputError(f"{path} was written by another command while this one ran; it is left as it is, and this "
                         f"command's output was discarded.")


def discard(tmp: Path) -> None:
    """Give up a temporary path: delete what was written there."""
    remove_path(tmp)
    _IN_FLIGHT.discard(tmp)


@contextlib.contextmanager
def atomic_path(path, shared: bool = False):
    """Yield a temporary path (see temporary_path) for the caller to write and `publish`; if the block raises, it
    is discarded and the old `path` is untouched."""
    tmp = temporary_path(path, shared)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    finally:
        _IN_FLIGHT.discard(tmp)


@contextlib.contextmanager
def atomic_file(path, size: int = 0, replace: bool = True):
    """Yield a binary file to write; on success it is flushed to disk and renamed to `path` (see publish for
    `replace`). A full disk is one line (disk_full_error) naming the folder and `size`, the bytes the file
    needs."""
    with atomic_path(path) as tmp:
        watched = None
        try:
            with open(tmp, "wb") as f:
                watched = _WatchedFile(f)
                yield watched
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            cause = watched.error if watched is not None and watched.error is not None else e
            if is_disk_full(cause):
                raise disk_full_error(path, size) from e
            if cause is not e:
                raise cause from e  # what torch.save turned into a RuntimeError of its own
            raise
        publish(tmp, path, replace)


class _WatchedFile:
    """The file object atomic_file yields. It keeps the first exception its writes raised, because torch.save
    turns any of them (a full disk, Ctrl+C, SIGTERM) into a RuntimeError of its own that says none of it."""

    def __init__(self, file):
        self.file = file
        self.error = None

    def write(self, data) -> int:
        try:
            return _write(self.file, data)
        except BaseException as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def _write(file, data) -> int:
    """Every byte of an atomic file passes here (the one place a test makes the disk full)."""
    return file.write(data)


def remove_path(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partial_files() -> None:
    """Delete whatever atomic writes are in progress (called just before a hard exit)."""
    for tmp in list(_IN_FLIGHT):
        remove_path(tmp)
