"""Every file and folder the toolkit writes appears whole or not at all: written under a temporary name beside
its final path, then renamed over it. The temporary names still in flight when a command ends (a signal that landed
before a writer could delete its own, a hard exit after a second Ctrl+C) are deleted then.

    with atomic_path("out/rwkv-3.pth") as tmp:   # tmp = out/.rwkv-3.pth.<pid>.partial
        write(tmp); fsync; publish(tmp, "out/rwkv-3.pth")

Writers whose files live longer than one block (the binidx builder) take `temporary_path` and end with
`publish` or `discard`.

The output discipline of every command that writes:

    found = check_output_file(out, args.overwrite, "OUT", inputs=[("HF_DIR", args.hf_dir)])  # before any work
    ...                                                                                      # the work
    save_weights(weights, out, replace=found)                                                 # atomic, checked

- the output is checked before any work (check_output_file, check_output_folder): a path that cannot be written, an
  existing one without the replace flag, an output that is an input, lies inside one or (a folder) holds one;
- what the check found there (a Found) is what publishing may replace: a file or folder that appeared or changed while
  the command ran is left as it is and the command's output is discarded with one line;
- the temporary name is this process's own, deleted when the block raises (an error, a signal: see
  src/cli.signals_interrupt), and when the command ends or quits at once (remove_partial_files).
"""
import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Tuple

from src import cli
from src.errors import UserInputError

# Temporary files and folders being written right now.
_IN_FLIGHT: set = set()
# Old folders moved aside while a new one takes their name: {aside: path}, put back when a command ends meanwhile.
_ASIDE: dict = {}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

Inputs = Iterable[Tuple[str, object]]  # (what, path) of each input of a command; a path of None or "" is skipped


class Found:
    """What was at an output path when the command checked it: nothing, a file (its inode, size and modification
    time) or a folder (its inode, and those of every entry under it). Passed as `replace` to publish (atomic_file,
    save_weights), it lets exactly that be replaced: a path still in that state is replaced, a path still absent is
    created, and one that appeared or changed meanwhile is left as it is, the new output discarded with one line."""

    def __init__(self, path):
        self.path = Path(path)
        self.state = _state_of(self.path)

    @property
    def exists(self) -> bool:
        return self.state is not None

    def unchanged(self, path=None) -> bool:
        """Whether `path` (default: the path checked) is in the state found."""
        return _state_of(self.path if path is None else Path(path)) == self.state


def _state_of(path: Path):
    """None (nothing), ("file", identity) or ("folder", identity, {relative path: identity of each entry})."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return ("unreadable", e.errno)
    if not stat.S_ISDIR(info.st_mode):
        return ("file", (info.st_dev, info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns))
    entries = {}
    for root, folders, files in os.walk(path):
        for name in folders + files:
            entry = os.path.join(root, name)
            try:
                e = os.lstat(entry)
            except OSError:
                entries[os.path.relpath(entry, path)] = None
                continue
            entries[os.path.relpath(entry, path)] = (e.st_ino, e.st_mode, e.st_size, e.st_mtime_ns)
    return ("folder", (info.st_dev, info.st_ino), entries)


def check_output_file(path, replace: bool, what: str, replace_flag: str = "--overwrite", inputs: Inputs = ()) -> Found:
    """Before any work: refuse an output file that cannot be written (a folder, under a file, in a folder that
    refuses new files), that already exists and `replace` is False, or that is one of `inputs` ((what, path) pairs)
    or lies inside one. `what` names the output in the message ("the output", "--output-prefix data/x");
    `replace_flag` is the flag that allows replacing. Nothing is created (see check_can_create). Returns what is
    there, for publish to replace only that."""
    path = Path(path)
    try:  # is_dir() itself raises under a folder that may not be searched
        if path.is_dir():
            raise UserInputError(f"{what} {path} is a folder; give a file name.")
        exists = path.exists()
        if exists and not path.is_file():
            raise UserInputError(f"{what} {path} is not a regular file (a named pipe or a device); give the name of a "
                                 f"file to write.")
    except OSError as e:
        raise UserInputError(f"{what} {path}: cannot look at it ({e.strerror}); choose a folder you can write to.")
    check_apart(path, what, inputs)
    if exists and not replace:
        raise UserInputError(f"{what} {path} already exists; choose another name, or pass {replace_flag} to "
                             f"replace it.")
    check_can_create(path.parent, f"{what} {path}")
    return Found(path)


def check_output_folder(path, replace: bool, what: str, replace_flag: str = "--overwrite",
                        inputs: Inputs = ()) -> Found:
    """Before any work: an output folder must be new, empty, or (with `replace`) one whose whole contents may be
    replaced; it must not be, hold or lie inside one of `inputs`, nor hold the working folder, and folders must be
    creatable where it goes. Returns what is there, for publish to replace only that."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserInputError(f"{what} {path} is a file; give the name of a folder to write.")
        non_empty = path.is_dir() and any(path.iterdir())
    except OSError as e:
        raise UserInputError(f"{what} {path}: cannot look at it ({e.strerror}); choose a folder you can write to.")
    check_apart(path, what, inputs, folder=True)
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise UserInputError(f"{what} {path} is the working folder or holds it, which replacing it would delete; "
                             f"give a folder of its own.")
    if non_empty and not replace:
        raise UserInputError(f"{what} {path} already exists and is not empty; choose another folder, or pass "
                             f"{replace_flag} to replace it.")
    check_can_create(path.resolve().parent, f"{what} {path}")
    return Found(path)


def check_apart(path, what: str, inputs: Inputs, folder: bool = False, way_out: str = "") -> None:
    """Refuse an output that is one of `inputs` ((what, path) pairs; the same file under another name counts), lies
    inside one, or, for a `folder` output, holds one: writing it would destroy what the command reads. `way_out` ends
    the message where choosing another output path is not the fix."""
    out = Path(path).resolve()
    for input_what, input_path in inputs:
        if input_path is None or str(input_path) == "":
            continue
        source = Path(input_path).resolve()
        if out == source or _same_file(out, source):
            raise UserInputError(f"{what} {path} is {input_what} {input_path}, which writing it would destroy; "
                                 f"{way_out or 'choose another ' + ('folder' if folder else 'name')}.")
        if out.is_relative_to(source):
            raise UserInputError(f"{what} {path} lies inside {input_what} {input_path}, which this command reads; "
                                 f"{way_out or 'choose a path outside it'}.")
        if folder and source.is_relative_to(out):
            raise UserInputError(f"{what} {path} holds {input_what} {input_path}, which writing the folder would "
                                 f"delete; {way_out or 'choose another folder'}.")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


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
    """Whether `error`, or an error it was raised from, is a write refused for lack of space (a full disk or an
    exhausted quota): an OSError, or the error of a library in Rust that names the OS error (safetensors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        if any(f"(os error {number})" in str(error) for number in _NO_SPACE):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path, needed_bytes: int, lower_bound: bool = False) -> UserInputError:
    """The one line for a write that ran out of space: the folder, what `path` needs (`needed_bytes`, or more than
    that with `lower_bound`; left out when unknown, 0) and what is free. The temporary file is deleted, so earlier
    files are whole."""
    path = _named(Path(path))
    parts = []
    if needed_bytes > 0:
        parts.append(f"{'more than' if lower_bound else 'about'} {_size_text(needed_bytes)} needed")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:  # an output folder not made yet
        existing = existing.parent
    try:
        parts.append(f"{_size_text(shutil.disk_usage(existing).free)} free")
    except OSError:
        pass
    sizes = f" ({', '.join(parts)})" if parts else ""
    return UserInputError(f"no space left on the device of {path.parent} for {path.name}{sizes}; make room there or "
                          f"choose another folder. Files written before are whole.")


def _size_text(n_bytes: float) -> str:
    """1234567 -> "1.23 MB"."""
    if n_bytes < 1000:
        return f"{n_bytes:.0f} bytes"
    for unit in ("kB", "MB", "GB"):
        n_bytes /= 1000
        if n_bytes < 999.5:  # what rounds to 1000 reads better as 1 of the next unit
            return f"{n_bytes:.3g} {unit}"
    return f"{n_bytes:,.0f} GB"


def _named(path: Path) -> Path:
    """`path` with a last component to name files after ("." and ".." resolved)."""
    return path.resolve() if path.name in ("", ".", "..") else path


def temporary_path(path, shared: bool = False) -> Path:
    """The temporary name beside `path`, this process's own: two commands writing the same output never write into
    one file. `shared`: the same name in every process, for a folder that the ranks of a run write together."""
    path = _named(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = "" if shared else f".{os.getpid()}"
    tmp = path.with_name(f".{path.name}{owner}.partial")
    _IN_FLIGHT.add(tmp)
    return tmp


def publish(tmp: Path, path, replace=True) -> None:
    """Move a finished temporary file or folder over `path` (an old folder is swapped out, then removed). `replace`:
    True replaces whatever is there; False creates `path` only, so a file that appeared there meanwhile (another
    command writing the same output) stays, and this one is discarded with one line; a Found (what the check before
    the work found) replaces only that, and refuses the same way what appeared or changed since."""
    path = _named(Path(path))
    if isinstance(replace, Found):
        _publish_over(tmp, path, replace)
    elif not replace:
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


def _publish_over(tmp: Path, path: Path, found: Found) -> None:
    """publish with a Found: the final existence check, in as few steps as the file system allows."""
    if not found.exists:
        if tmp.is_dir():
            if os.path.lexists(path):
                _refuse_a_newcomer(tmp, path)
            try:  # a rename over an existing folder fails unless it is empty (then nothing is lost)
                os.rename(tmp, path)
            except OSError:
                _refuse_a_newcomer(tmp, path)
            _IN_FLIGHT.discard(tmp)
        else:
            _publish_new_file(tmp, path)
        return
    if found.state[0] != "folder":
        if not found.unchanged(path):
            _refuse_a_newcomer(tmp, path)
        os.replace(tmp, path)
        _IN_FLIGHT.discard(tmp)
        return
    # a folder: moved aside first, so that nothing can be written into it between its check and its replacement
    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        os.rename(path, aside)
    except OSError:
        _refuse_a_newcomer(tmp, path)
    _ASIDE[aside] = path
    if not found.unchanged(aside):
        _put_back(aside, path)
        _refuse_a_newcomer(tmp, path)
    try:
        os.rename(tmp, path)
    except OSError:  # a folder appeared under the old one's name in between: both stay
        _ASIDE.pop(aside, None)
        discard(tmp)
        raise UserInputError(f"{path} was written by another command while this one ran; it is left as it is, the "
                             f"folder that was there before is now {aside}, and this command's output was discarded.")
    _IN_FLIGHT.discard(tmp)
    _ASIDE.pop(aside, None)
    remove_path(aside)


def _put_back(aside: Path, path: Path) -> None:
    """An old folder moved aside returns to its name (unless something took that name)."""
    try:
        os.rename(aside, path)
    except OSError:
        return
    _ASIDE.pop(aside, None)


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
    check_unchanged(None, path, tmp)


def check_unchanged(found: Optional[Found], path, *tmps: Path) -> None:
    """Refuse when `path` is not in the state `found` found it in (None: refuse anyway), discarding `tmps`: another
    command wrote it while this one ran. For outputs published together (a .bin and its .idx): each is checked before
    any is published."""
    if found is not None and found.unchanged(path):
        return
    for tmp in tmps:
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
def atomic_file(path, size: int = 0, replace=True):
    """Yield a binary file to write; on success it is flushed to disk and renamed to `path` (see publish for
    `replace`). A full disk is one line (disk_full_error) naming the folder and `size`, the bytes the file
    needs (0: unknown, then the bytes it was given so far are named as a lower bound)."""
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
                given = watched.given if watched is not None else 0
                raise disk_full_error(path, size or given, lower_bound=not size) from e
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
        self.given = 0  # bytes given to write, the failed write's included

    def write(self, data) -> int:
        if self.error is not None:  # torch.save goes on writing after a failed write: stop it at once
            raise self.error
        self.given += memoryview(data).nbytes
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


def remove_partial_files() -> None:  # registered below with cli.at_the_end
    """Delete whatever atomic writes are in flight, and put back an old folder moved aside for a new one (called when
    a command ends, and just before a hard exit)."""
    for tmp in list(_IN_FLIGHT):
        remove_path(tmp)
    for aside, path in list(_ASIDE.items()):
        _put_back(aside, path)


cli.at_the_end(remove_partial_files)
