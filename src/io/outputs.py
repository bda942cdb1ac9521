"""What a run writes into --proj_dir, and the checks that keep earlier work safe before anything is written.

A run writes rwkv-init.pth (a fresh model only, when training starts), rwkv-<epoch>.pth for the mini-epochs it
saves, rwkv-final.pth when it reaches --epoch_count, and on a Ctrl+C / SIGTERM stop rwkv-last.pth and the resume
bundle. It refuses to start when one of those files is already there (unless --overwrite_proj_dir 1). Files it
does not write, such as the rwkv-0..N.pth a hand-continued run (--load_model out/rwkv-N.pth --epoch_begin N+1)
starts after, never count; nor does that run's rwkv-final.pth while rwkv-N.pth keeps a copy of its weights.
train_log.txt, train_steps.tsv and valid.tsv (src/eval/valid_tsv.py) are appended to, as the original's log.

No torch import: these checks run before the heavy imports matter.
"""
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from src.io.atomic import check_apart, check_can_create
from src.errors import UserInputError

INIT_NAME = "rwkv-init.pth"
FINAL_NAME = "rwkv-final.pth"
LAST_NAME = "rwkv-last.pth"
BUNDLE_NAME = "rwkv-resume.ckpt"
# files appended to by every run in the folder (src/train/callbacks.py, src/train/held_out.py write them; plot_run.py reads them)
LOG_NAME = "train_log.txt"
STEP_LOG_NAME = "train_steps.tsv"
STEP_LOG_COLUMNS = ("step", "epoch", "loss", "lr", "ctx_len", "Gtokens", "kt/s")
VOCAB_NAME = "vocab.json"  # of character-level data
# the flags that name files a run reads
INPUT_FLAGS = ("load_model", "lora_load", "resume", "data_file", "valid_data_file", "vocab_file", "instruct_data_file",
               "names_data_file")


@dataclass(frozen=True)
class RunFiles:
    """The flags that decide which files a run writes into --proj_dir, and the files it reads (INPUT_FLAGS)."""
    proj_dir: str
    epoch_begin: int
    epoch_count: int
    max_epochs: Optional[int]
    epoch_save: int
    load_model: str
    resume: str
    overwrite_proj_dir: int
    character_level: bool  # writes vocab.json
    inputs: tuple  # ("--flag", path) of every flag of INPUT_FLAGS

    @classmethod
    def from_flags(cls, cfg) -> "RunFiles":
        """cfg: train.py's flags (src/config.py)."""
        return cls(proj_dir=cfg.proj_dir, epoch_begin=cfg.epoch_begin, epoch_count=cfg.epoch_count,
                   max_epochs=cfg.max_epochs, epoch_save=cfg.epoch_save, load_model=cfg.load_model, resume=cfg.resume,
                   overwrite_proj_dir=cfg.overwrite_proj_dir, character_level=cfg.character_level,
                   inputs=tuple((f"--{name}", getattr(cfg, name)) for name in INPUT_FLAGS))


def epoch_file_name(real_epoch: int) -> str:
    return f"rwkv-{real_epoch}.pth"


def run_epochs(files: RunFiles) -> int:
    """Mini-epochs this run trains: up to --epoch_count, capped by --max_epochs."""
    epochs = files.epoch_count - files.epoch_begin
    return epochs if files.max_epochs is None else min(epochs, files.max_epochs)


def saves_epoch(epoch: int, files: RunFiles) -> bool:
    """Whether mini-epoch `epoch` of this run (counted from 0) is saved: every --epoch_save-th, and the last one
    this run trains (the last of --epoch_count, or the last before a --max_epochs cap: no trained mini-epoch
    goes unsaved at the end of a run)."""
    return (files.epoch_save > 0 and epoch % files.epoch_save == 0) or epoch == run_epochs(files) - 1


def files_written(files: RunFiles, first_epoch: int = 0) -> list:
    """Names of the files this run may write into --proj_dir, starting at mini-epoch `first_epoch` of the run
    (a resumed run starts in the mini-epoch its bundle stopped in)."""
    names = [INIT_NAME] if writes_init_file(files) else []
    names += [epoch_file_name(files.epoch_begin + epoch) for epoch in range(first_epoch, run_epochs(files))
              if saves_epoch(epoch, files)]
    if files.epoch_begin + run_epochs(files) == files.epoch_count:
        names.append(FINAL_NAME)
    return names + [LAST_NAME, BUNDLE_NAME]  # written only if the run is stopped, but they replace what is there


def writes_init_file(files: RunFiles) -> bool:
    """A fresh model is saved as rwkv-init.pth when training starts; loaded and resumed weights are not."""
    return not (files.load_model or files.resume)


def check_writable(proj_dir: str) -> None:
    """Refuse a --proj_dir where no file can be created: under a file, read-only, in /proc. Nothing is created."""
    check_can_create(proj_dir, f"--proj_dir {proj_dir}")


def check_no_overwrite(files: RunFiles, first_epoch: int = 0) -> None:
    """Refuse to start when --proj_dir already holds a file this run would write (see files_written), unless
    the run resumes in its bundle's own folder: the files there are the stopped run's, and rewriting them is the
    point of --resume."""
    if _resumes_in_place(files):
        return
    proj_dir = Path(files.proj_dir)
    existing = [name for name in _replaceable(files, first_epoch) if (proj_dir / name).exists()]
    if not existing or files.overwrite_proj_dir:
        return
    stopped_run = (f"; it holds a stopped run: continue it with --resume {proj_dir / BUNDLE_NAME}"
                   if BUNDLE_NAME in existing and not files.resume else "")
    raise UserInputError(f"--proj_dir {files.proj_dir} already holds files this run would write: "
                         f"{_short_list(existing)}{stopped_run}; move them away, choose another --proj_dir, or pass "
                         f"--overwrite_proj_dir 1 to replace them")


def check_inputs_apart(files: RunFiles, first_epoch: int = 0, more_logs: tuple = ()) -> None:
    """Refuse a run that would write over one of its own inputs, even with --overwrite_proj_dir 1: a file it writes
    into --proj_dir (see files_written; its logs, those of `more_logs` as check_appended_logs takes them, the
    vocab.json of character-level data) that is a file given by a flag (--load_model out/rwkv-final.pth) or lies inside
    one. A run resuming in its bundle's own folder rewrites the bundle: that is the point of --resume."""
    inputs = [(flag, path) for flag, path in files.inputs if not (flag == "--resume" and _resumes_in_place(files))]
    names = [*_replaceable(files, first_epoch), LOG_NAME, STEP_LOG_NAME, *(name for name, _ in more_logs)]
    if files.character_level:
        names.append(VOCAB_NAME)
    for name in names:
        check_apart(Path(files.proj_dir) / name, "this run's output", inputs,
                    way_out="copy it elsewhere and give that copy, or choose another --proj_dir")


def check_no_folder_in_the_way(files: RunFiles, first_epoch: int = 0) -> None:
    """Refuse a --proj_dir where a folder has the name of a file this run writes (the resume bundle may be a
    folder: DeepSpeed writes it so)."""
    names = [name for name in files_written(files, first_epoch) if name != BUNDLE_NAME]
    folders = [name for name in [*names, LOG_NAME, STEP_LOG_NAME, VOCAB_NAME]
               if (Path(files.proj_dir) / name).is_dir()]
    if folders:
        raise UserInputError(f"--proj_dir {files.proj_dir} holds folders named as files this run writes: "
                             f"{_short_list(folders)}; move them away, or choose another --proj_dir")


def check_appended_logs(proj_dir: str, more: tuple = ()) -> None:
    """Refuse a --proj_dir whose logs this run appends to (train_log.txt, train_steps.tsv, and `more`: (name,
    header columns) of other appended TSVs, e.g. valid.tsv) hold something else: rows appended to another file's text
    would mix with it under no header. Refused: a folder or other non-file, a file that cannot be read or written,
    and text that does not open as the log does (train_log.txt with 'NEW RUN', a TSV with its header line). An empty
    file is taken as a new log."""
    logs = [(LOG_NAME, "NEW RUN "), (STEP_LOG_NAME, "\t".join(STEP_LOG_COLUMNS) + "\n")]
    logs += [(name, "\t".join(columns) + "\n") for name, columns in more]
    for name, opening in logs:
        _check_appended_log(Path(proj_dir) / name, opening)


def _check_appended_log(path: Path, opening: str) -> None:
    way_out = "move it away, or choose another --proj_dir"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserInputError(f"--proj_dir: {path} cannot be read ({e.strerror}); {way_out}")
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserInputError(f"--proj_dir: {path} is {what}, but this run appends its log to it; {way_out}")
    try:
        with open(path, "rb") as f:
            start = f.read(len(opening.encode("utf-8")))
    except OSError as e:
        raise UserInputError(f"--proj_dir: {path} cannot be read ({e.strerror}); {way_out}")
    if start and start != opening.encode("utf-8"):
        shown = start.decode("utf-8", errors="replace").split("\n")[0][:40]
        raise UserInputError(f"--proj_dir: {path} holds other text than this toolkit's log (it starts with {shown!r}, "
                             f"not {opening.strip()[:40]!r}), and this run would append its rows under it; {way_out}")
    if not os.access(path, os.W_OK):
        raise UserInputError(f"--proj_dir: {path} is read-only, and this run appends its log to it; make it "
                             f"writable, or choose another --proj_dir")


def _resumes_in_place(files: RunFiles) -> bool:
    return bool(files.resume) and Path(files.resume).resolve().parent == Path(files.proj_dir).resolve()


def _replaceable(files: RunFiles, first_epoch: int) -> list:
    """The files this run writes (files_written) whose earlier copies hold work: not an rwkv-final.pth whose weights
    rwkv-N.pth keeps (see _final_is_kept_as_epoch_file)."""
    names = files_written(files, first_epoch)
    return [name for name in names if not (name == FINAL_NAME and _final_is_kept_as_epoch_file(files))]


def _final_is_kept_as_epoch_file(files: RunFiles) -> bool:
    """A run that ended at mini-epoch N saved rwkv-N.pth and the same weights as rwkv-final.pth (the last
    mini-epoch is always saved). While rwkv-N.pth is there, a run continuing at --epoch_begin N+1 may replace
    rwkv-final.pth without losing anything."""
    return files.epoch_begin > 0 and (Path(files.proj_dir) / epoch_file_name(files.epoch_begin - 1)).exists()


def _short_list(names: list, limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
