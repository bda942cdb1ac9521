"""Every file and folder the toolkit writes appears whole or not at all: written under a temporary name beside
its final path, then renamed over it. A hard exit (a second Ctrl+C) deletes the temporary names in flight.

    with atomic_path("out/rwkv-3.pth") as tmp:   # tmp = out/.rwkv-3.pth.partial
        write(tmp); fsync; publish(tmp, "out/rwkv-3.pth")

Writers whose files live longer than one block (the binidx builder) take `temporary_path` and end with
`publish` or `discard`.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from src.errors import UserInputError

# Temporary files and folders being written right now.
_IN_FLIGHT: set = set()


def check_output_file(path, replace: bool, what: str, replace_flag: str = "--overwrite") -> None:
    """Before any work: refuse an output file that cannot be written (a folder, under a file, in a folder that
    refuses new files) or that already exists and `replace` is False. `what` names the output in the message
    ("the output", "--output-prefix data/x"); `replace_flag` is the flag that allows replacing. Nothing is
    created: the nearest existing folder is probed with a temporary file that deletes itself."""
    path = Path(path)
    try:  # exists() itself raises under a folder that may not be searched
        if path.is_dir():
            raise UserInputError(f"{what} {path} is a folder; give a file name.")
        if path.exists() and not replace:
            raise UserInputError(f"{what} {path} already exists; choose another name, or pass {replace_flag} to "
                                 f"replace it.")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UserInputError(f"{what} {path}: {folder} is a file, not a folder; choose another path.")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserInputError(f"{what} {path}: cannot create files in {folder} ({e.strerror}); choose a folder you "
                             f"can write to.")


def temporary_path(path) -> Path:
    """The temporary name beside `path` (the same on every rank, for folders that several processes write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    _IN_FLIGHT.add(tmp)
    return tmp


def publish(tmp: Path, path) -> None:
    """Move a finished temporary file or folder over `path` (an old folder is swapped out, then removed)."""
    path = Path(path)
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        remove_path(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)
    _IN_FLIGHT.discard(tmp)


def discard(tmp: Path) -> None:
    """Give up a temporary path: delete what was written there."""
    remove_path(tmp)
    _IN_FLIGHT.discard(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path for the caller to write and `publish`; if the block raises, it is discarded and
    the old `path` is untouched."""
    tmp = temporary_path(path)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    finally:
        _IN_FLIGHT.discard(tmp)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a binary file to write; on success it is flushed to disk and renamed to `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)


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
