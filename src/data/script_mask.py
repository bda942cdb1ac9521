"""--my_script_mask '<cut>_<n>' of the fork: which targets of a window train.

cut = 1 masks the targets past the end of the document the window starts in (binidx document boundaries);
n masks the first n targets.

A window whose every target is masked trains nothing: a mask under which no window of the data trains is refused
before training (check_some_window_trains); a random window masked whole is drawn again (src/data/dataset.py).
"""
import numpy as np

from src.data.binidx import MMapIndexedDataset
from src.errors import UserInputError
from src.data.types import WINDOW_DATA_TYPES


def parse_script_mask(value: str) -> tuple:
    """--my_script_mask '<cut>_<n>' -> (cut the next document: bool, masked first targets: int)."""
    cut, separator, prefix = value.partition("_")
    if not separator or cut not in ("0", "1") or not prefix.isdigit():
        raise UserInputError(f"--my_script_mask {value!r} must be '<cut>_<n>' with cut 0 or 1 and n the number of "
                             f"first targets to mask, e.g. 1_4.")
    return cut == "1", int(prefix)


def check_script_mask_flags(cfg) -> None:
    """--my_script_mask: its syntax, and a --data_type it can mask (cfg: train.py's flags; reads only
    --my_script_mask and --data_type)."""
    if cfg.my_script_mask is None:
        return
    cut, _ = parse_script_mask(cfg.my_script_mask)
    if cfg.data_type not in WINDOW_DATA_TYPES:
        raise UserInputError(f"--my_script_mask masks windows of {', '.join(WINDOW_DATA_TYPES)} data, not "
                             f"--data_type {cfg.data_type}.")
    if cut and cfg.data_type != "binidx":
        raise UserInputError(f"--my_script_mask {cfg.my_script_mask}: cut=1 needs the document boundaries of "
                             f"--data_type binidx; use 0_<n> for {cfg.data_type}.")


def trained_targets(start: int, n_targets: int, cut: bool, prefix: int, data: MMapIndexedDataset) -> np.ndarray:
    """Which of the targets (tokens start+1 .. start+n_targets) train under --my_script_mask '<cut>_<prefix>'.

    cut: targets past the end of the document that holds token `start` are not trained (the window ran into
    the next document); prefix: the first `prefix` targets are not trained.
    """
    trained = np.ones(n_targets, dtype=bool)
    if cut:
        _, document_end = data.document_bounds(start)
        trained[max(document_end - (start + 1), 0):] = False
    trained[:prefix] = False
    return trained


def check_some_window_trains(value: str, shortest: int, longest: int, data: MMapIndexedDataset,
                             n_tokens: int, warm_up: str = "") -> None:
    """Refuse --my_script_mask `value` when no window of the data has a target it trains, before anything is written:
    windows of `shortest` to `longest` targets (the context warm-up's first length, and --ctx_len) starting at a
    random token of the `n_tokens` (a window of L targets starts before n_tokens - L). `warm_up` names the
    warm-up flag that sets `shortest`, for the message."""
    cut, prefix = parse_script_mask(value)
    if prefix >= shortest:
        raise UserInputError(f"--my_script_mask {value} masks the first {prefix} targets of every window, but windows "
                             f"have {shortest} targets ({warm_up or f'--ctx_len {longest}'}): no target would train; "
                             f"mask fewer than {shortest}")
    if not cut:
        return
    # a window trains when it starts before its document's last prefix + 1 tokens; the earliest start of a document,
    # its first token, is the best one, and must come before the last start a window of `longest` targets can have
    starts = data.item_starts
    ends = starts + data.sizes.astype(np.int64)
    if not np.any(starts < np.minimum(ends - prefix - 1, n_tokens - longest)):
        after = f", after its first {prefix}," if prefix else ""
        raise UserInputError(f"--my_script_mask {value} masks every target of every window of {data.bin_path}: cut=1 "
                             f"trains only the targets inside a window's first document{after} and no document that a "
                             f"window of --ctx_len {longest} can start in has more than {prefix + 1} "
                             f"token{'s' * (prefix > 0)}; use cut=0 (0_{prefix}), a smaller n, or data with longer "
                             f"documents")
