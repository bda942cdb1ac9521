"""The windows of a data file for held-out evaluation (src/eval/engine.py), for every --data_type train.py reads.

Token streams are cut into consecutive windows of L = ctx_len inputs: window i has inputs data[i*L : i*L+L]
and targets data[i*L+1 : i*L+L+1], for every i with i*L+L+1 <= N; the tail that fills no whole window is
left out. The streams: numpy, the array; binidx, the documents' tokens in file order (the .bin); utf-8,
utf-16le and dummy, the text's characters.

Data that training samples a document at a time, from an empty state, is cut the same way one document at a
time: jsonl (a document per line) and uint16 (a row of --my_sample_len per document). A document of n tokens
gives windows of L inputs from its start, the last one shorter, so each of its tokens after the first is a
target exactly once.

N is the number of tokens read: all of them, or the first --max_tokens (documents back to back).

Masks as in training: --my_script_mask through src/data/script_mask.py (each window masked as a training
window starting at the same token), --select_name through the speaker mask of src/data/jsonl.py, computed
when the documents are read (src/data/dataset.py load_token_data reads every type).

Character-level data is numbered by the model's own characters (a vocab.json, or the training text's): ids
given by the evaluated text's own characters would mean other characters to the model.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from src.data import dataset
from src.data.binidx import MMapIndexedDataset
from src.data.types import CHARACTER_DATA_TYPES
from src.errors import UserInputError
from src.loss import IGNORE_INDEX
from src.data.script_mask import parse_script_mask, trained_targets


@dataclass
class EvalWindows:
    """Windows over one token array: window k is tokens[bounds[k, 0] : bounds[k, 1]] (inputs: all but its last
    token; targets: all but its first)."""
    tokens: np.ndarray  # 1-D ids
    bounds: np.ndarray  # (windows, 2) int64 [start, end)
    source: str  # for messages
    trained: Optional[np.ndarray] = None  # per token, jsonl: whether it is trained when it is a target
    script_mask: Optional[tuple] = None  # (cut, masked first targets) of --my_script_mask
    binidx: Optional[MMapIndexedDataset] = None  # the documents script_mask cuts at

    def __len__(self) -> int:
        return len(self.bounds)

    def has_a_target(self) -> bool:
        """Whether some window has a target its masks leave in (read up to the first such window)."""
        if self.trained is None and self.script_mask is None:
            return len(self) > 0
        return any(bool((self[k][1] != IGNORE_INDEX).any()) for k in range(len(self)))

    def __getitem__(self, k: int) -> tuple:
        """(x, y): 1-D int64 inputs and targets of window k, IGNORE_INDEX where masked."""
        start, end = (int(i) for i in self.bounds[k])
        if self.trained is not None:
            trained = self.trained[start + 1:end]
        elif self.script_mask is not None:
            trained = trained_targets(start, end - start - 1, *self.script_mask, self.binidx)
        else:
            trained = None
        return dataset.inputs_and_targets(self.tokens[start:end], trained)


def stream_bounds(n_tokens: int, ctx_len: int) -> np.ndarray:
    """[start, end) of the windows of a stream of n_tokens: [i*L, i*L+L+1) for every i with i*L+L+1 <= n_tokens."""
    starts = np.arange(max(n_tokens - 1, 0) // ctx_len, dtype=np.int64) * ctx_len
    return np.stack([starts, starts + ctx_len + 1], axis=1)


def document_bounds(starts: np.ndarray, ctx_len: int, n_tokens: int) -> np.ndarray:
    """[start, end) of the windows of documents tokens[starts[k]:starts[k+1]], cut at n_tokens: from each
    document's start, windows of ctx_len inputs, its last window shorter."""
    bounds = []
    for begin, end in zip(starts[:-1], np.minimum(starts[1:], n_tokens)):
        window_starts = np.arange(begin, end - 1, ctx_len, dtype=np.int64)
        bounds.append(np.stack([window_starts, np.minimum(window_starts + ctx_len + 1, end)], axis=1))
    return np.concatenate(bounds) if bounds else np.zeros((0, 2), dtype=np.int64)


def load_windows(flags: dataset.DataFile, max_tokens: int = 0, chars: Optional[list] = None) -> EvalWindows:
    """The held-out evaluation windows of flags.data_file read as flags.data_type, flags.ctx_len inputs long, within the
    first `max_tokens` tokens (0: all), masked per the mask flags. `chars`: the model's characters, for
    character-level data. flags.vocab_size is the model's: ids outside it are refused."""
    # character-level data: the file's own characters are read (renumbered to the model's below)
    data_flags = dataclasses.replace(flags, instruct_data_file="", train_split_ratio=None, train_data_sort=None,
                                     vocab_size=0 if flags.data_type in CHARACTER_DATA_TYPES else flags.vocab_size)
    data = dataset.load_token_data(data_flags)
    if data.chars is not None:
        if chars is None:
            raise ValueError("character-level data needs the model's characters")
        tokens = renumber(data.tokens, data.chars, chars, data.source)
    else:
        tokens = data.tokens.reshape(-1)  # uint16 rows back to back
    n_tokens = len(tokens) if not max_tokens else min(len(tokens), max_tokens)
    trained = None
    if data.documents is not None:
        bounds = document_bounds(data.documents.starts, flags.ctx_len, n_tokens)
        trained = data.documents.trained
    elif flags.data_type == "uint16":
        bounds = document_bounds(np.arange(0, len(tokens) + 1, flags.my_sample_len), flags.ctx_len, n_tokens)
    else:
        bounds = stream_bounds(n_tokens, flags.ctx_len)
    if len(bounds) == 0:
        capped = f" (the first --max_tokens {max_tokens})" if n_tokens < len(tokens) else ""
        raise UserInputError(f"{data.source}: {n_tokens} tokens{capped} give no window of --ctx_len {flags.ctx_len} "
                             f"(a window needs ctx_len + 1 = {flags.ctx_len + 1} tokens); lower --ctx_len or give more "
                             f"data")
    dataset.check_token_ids(tokens[:n_tokens], data.source, flags.vocab_size)
    script_mask = parse_script_mask(flags.my_script_mask) if flags.my_script_mask else None
    return EvalWindows(tokens, bounds, data.source, trained, script_mask, data.binidx)


def renumber(tokens: np.ndarray, own_chars: list, model_chars: list, source: str) -> np.ndarray:
    """Character-level ids of a text (numbered by its own sorted characters) -> ids of the model's characters."""
    model_id = {c: i for i, c in enumerate(model_chars)}
    unknown = [c for c in own_chars if c not in model_id]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (f" and {len(unknown) - 10} more" * (len(unknown) > 10))
        raise UserInputError(f"{source} holds characters the model has never seen ({shown}); a character-level model "
                             f"knows only the {len(model_chars)} characters of its training text")
    mapping = np.array([model_id[c] for c in own_chars], dtype=np.int64)
    return mapping[np.asarray(tokens, dtype=np.int64)]

