"""--my_script_mask '<cut>_<n>' of the fork: which targets of a window train.

cut = 1 masks the targets past the end of the document the window starts in (binidx document boundaries);
n masks the first n targets.
"""
import numpy as np

from src.data.binidx import MMapIndexedDataset
from src.errors import UserInputError


def parse_script_mask(value: str) -> tuple:
    """--my_script_mask '<cut>_<n>' -> (cut the next document: bool, masked first targets: int)."""
    cut, separator, prefix = value.partition("_")
    if not separator or cut not in ("0", "1") or not prefix.isdigit():
        raise UserInputError(f"--my_script_mask {value!r} must be '<cut>_<n>' with cut 0 or 1 and n the number of "
                             f"first targets to mask, e.g. 1_4.")
    return cut == "1", int(prefix)


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
