"""Training samples for every --data_type, drawn by pure functions of (seed, rank, epoch, index).

Nothing about sampling lives in mutable dataset attributes: a sample is a function of its global
index, so ranks and resumed runs all draw the same windows for the same step.

A "mini-epoch" is `epoch_steps` micro-batches per GPU (`__len__ = epoch_steps * micro_bsz`).
Each sample is a window of L+1 tokens: x = window[:-1], y = window[1:], L = ctx_len (or the current
length of the context warm-up). Targets that must not be trained are -100. With --instruct_data_file, a
sample is built from chats instead with probability --instruct_data_ratio (src/data/instruct.py), drawn
from the sample's own generator like everything else.

Reading --data_file takes the flags it reads (DataFile). The checks against the model and sampling take train.py's
whole config (src/config.py): the data flags of every --data_type, Pile mode, masks, the context warm-up, instruct
mixing and the run's epochs, about twenty of them.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from src.data import instruct, jsonl, pile_mode
from src.accumulation import accumulation_at, optimizer_steps_before
from src.io.atomic import atomic_file
from src.data.binidx import MMapIndexedDataset
from src.config import TrainConfig
from src.errors import StopsTraining, UserInputError
from src.loss import IGNORE_INDEX
from src.io.outputs import VOCAB_NAME
from src.data.script_mask import check_some_window_trains, parse_script_mask, trained_targets
from src.data.jsonl_lines import check_input_file

# How many tokens np.max reads at once when checking ids against the vocabulary.
_SCAN_CHUNK = 1 << 26
# Windows drawn again, from the sample's own generator, for a sample whose first window --my_script_mask masks
# whole (it starts in its document's last tokens); each costs microseconds.
WINDOW_REDRAWS = 1000


@dataclass
class TokenData:
    """A flat token stream (or rows, for uint16) plus where it came from."""
    tokens: np.ndarray  # 1-D ints (np.memmap for files); for uint16 data: 2-D (rows, my_sample_len)
    source: str  # file name for messages
    vocab_size: int
    binidx: Optional[MMapIndexedDataset] = None
    documents: Optional[jsonl.Documents] = None  # jsonl: tokens holds the documents' ids back to back
    chats: Optional[instruct.Chats] = None  # --instruct_data_file
    chars: Optional[list] = None  # char-level data (utf-8, utf-16le, dummy): the character of each token id
    note: str = ""  # a line for the user about the data (jsonl documents left out)


@dataclass(frozen=True)
class DataFile:
    """The flags that say how --data_file is read (load_token_data; src/eval/windows.py cuts it into windows)."""
    data_file: str
    data_type: str
    vocab_size: int
    vocab_file: str
    ctx_len: int
    my_sample_len: int
    train_split_ratio: Optional[float]
    train_data_sort: Optional[str]
    select_name: Optional[str]
    my_script_mask: Optional[str]
    initial_ctx_len: Optional[int]
    instruct_data_file: str
    names_data_file: Optional[str]

    @classmethod
    def from_flags(cls, cfg) -> "DataFile":
        """cfg: train.py's flags (src/config.py)."""
        return cls(**{field.name: getattr(cfg, field.name) for field in fields(cls)})


def dummy_text() -> str:
    """The original's built-in data: 100000 sums '.{a}+{b}={a+b}.' with a = i mod 1e4, b = i^2 mod 1e4."""
    return "".join(f".{i % 10000}+{i * i % 10000}={i % 10000 + i * i % 10000}." for i in range(100000))


def char_tokens(text: str) -> tuple:
    """(char-level tokens of `text`, the sorted characters: token id -> character)."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    dtype = np.uint16 if len(chars) <= 65536 else np.int32
    return np.fromiter((stoi[c] for c in text), dtype=dtype, count=len(text)), chars


def write_char_vocab(chars: list, proj_dir: str) -> None:
    """proj_dir/vocab.json as the original writes it: {id: char}, UTF-16LE (written whole or not at all)."""
    data = json.dumps(dict(enumerate(chars)), ensure_ascii=False).encode("utf-16le")
    with atomic_file(Path(proj_dir) / VOCAB_NAME, size=len(data)) as f:
        f.write(data)


def check_char_vocab(chars: list, cfg: TrainConfig) -> None:
    """vocab.json in --proj_dir says which character each token id of the checkpoints there stands for: a run
    whose text has other characters would rewrite it under them. Refused, listing the difference, unless a fresh
    model replaces the folder's files (--overwrite_proj_dir 1 without --load_model or --resume)."""
    path = Path(cfg.proj_dir) / VOCAB_NAME
    if not path.is_file() or (cfg.overwrite_proj_dir and not (cfg.load_model or cfg.resume)):
        return
    try:
        stored = json.loads(path.read_bytes().decode("utf-16le"))
        stored = [stored[str(i)] for i in range(len(stored))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path} cannot be read as the vocabulary of the checkpoints there ({e}); move it away "
                             f"or choose another --proj_dir")
    if stored == chars:
        return
    only_data, only_stored = sorted(set(chars) - set(stored)), sorted(set(stored) - set(chars))
    differences = [f"{len(chars)} characters vs {len(stored)}"]
    differences += [f"{what}: {_shown(found)}" for what, found in (("only in the data", only_data),
                                                                   ("only in vocab.json", only_stored)) if found]
    if not (only_data or only_stored):
        differences.append("the same characters under other ids")
    raise UserInputError(f"{cfg.data_file or 'the data'} has other characters than {path}, the vocabulary of the "
                         f"checkpoints in --proj_dir ({'; '.join(differences)}); train on text with the same "
                         f"characters, or into another --proj_dir")


def _shown(chars: list, limit: int = 20) -> str:
    shown = " ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def read_char_vocab(path) -> list:
    """The characters of a vocab.json that write_char_vocab wrote (token id -> character)."""
    try:
        table = json.loads(Path(path).read_bytes().decode("utf-16le"))
        chars = [table[str(i)] for i in range(len(table))]
    except (OSError, ValueError, KeyError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserInputError(f"{path} is not the vocab.json of a character-level run ({type(e).__name__}: {e})")
    if not all(isinstance(c, str) and len(c) == 1 for c in chars):
        raise UserInputError(f"{path} is not the vocab.json of a character-level run (its values are not single "
                             f"characters)")
    return chars


def load_token_data(flags: DataFile) -> TokenData:
    """Open --data_file per --data_type (char-level types compute the vocabulary), and the chats to mix in."""
    data = _read_data_file(flags)
    if flags.instruct_data_file:
        data.chats = instruct.load_chats(flags)
    return data


def _read_data_file(flags: DataFile) -> TokenData:
    kind, path = flags.data_type, flags.data_file
    if kind == "dummy":
        tokens, chars = char_tokens(dummy_text())
        _check_vocab_size_flag(flags, len(chars), "the built-in dummy data")
        return TokenData(tokens, "built-in dummy data", len(chars), chars=chars)
    check_data_path("--data_file", path, kind)
    if kind in ("utf-8", "utf-16le"):
        try:
            text = Path(path).read_text(encoding=kind)
        except UnicodeDecodeError as e:
            raise UserInputError(f"--data_file {path} is not valid {kind} text ({e}); pass the right --data_type")
        tokens, chars = char_tokens(text)
        _check_vocab_size_flag(flags, len(chars), path)
        return TokenData(tokens, path, len(chars), chars=chars)
    if flags.vocab_size <= 0:
        raise UserInputError(f"--data_type {kind} needs --vocab_size (50277 for the GPT-NeoX 20B tokenizer, "
                             f"65536 for World)")
    if kind == "jsonl":
        documents = jsonl.load_documents(flags)
        return TokenData(documents.tokens, path, flags.vocab_size, documents=documents, note=documents.note)
    if kind == "binidx":
        data = MMapIndexedDataset(path)  # refuses indexes of non-integer tokens
        return TokenData(data.tokens, str(data.bin_path), flags.vocab_size, binidx=data)
    if kind == "numpy":
        return TokenData(read_npy_tokens(path), path, flags.vocab_size)
    if kind == "uint16":
        size = Path(path).stat().st_size
        if size % 2:
            raise UserInputError(f"--data_file {path} is {size} bytes, not a whole number of uint16 tokens (2 bytes "
                                 f"each): it is truncated or not uint16 data")
        rows = size // 2 // flags.my_sample_len
        if rows < 1:
            raise UserInputError(f"--data_file {path} holds {size // 2} tokens, less than one row of "
                                 f"--my_sample_len {flags.my_sample_len}")
        flat = np.memmap(path, mode="r", dtype=np.uint16)
        return TokenData(flat[:rows * flags.my_sample_len].reshape(rows, flags.my_sample_len), path,
                         flags.vocab_size)
    raise UserInputError(f"--data_type {kind} is not supported yet")


def _check_vocab_size_flag(flags: DataFile, n_chars: int, source: str) -> None:
    """Character-level data sets the vocabulary itself (one id per character): a --vocab_size that disagrees would
    be ignored."""
    if flags.vocab_size and flags.vocab_size != n_chars:
        raise UserInputError(f"--vocab_size {flags.vocab_size}: the characters of {source} set the vocabulary of "
                             f"--data_type {flags.data_type} ({n_chars} of them); leave --vocab_size out (or 0)")


# what a path of each --data_type names, for the message when it names a folder
_DATA_FILES = {"numpy": "a .npy file of token ids (numpy.save)", "uint16": "a file of uint16 token ids",
               "utf-8": "a UTF-8 text file", "utf-16le": "a UTF-16LE text file", "jsonl": "a .jsonl file"}
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz archive (numpy.savez)
_PICKLE_OPENING = b"\x80"  # pickle protocol 2 and above


def check_data_path(flag: str, path: str, kind: str, type_flag: str = "--data_type") -> None:
    """Refuse a path of data of `kind` given to `flag` that names no such data: a folder (for binidx, with the
    prefixes in it), a missing file. A binidx path is the prefix of its .bin and .idx; a prefix ending in '/' names
    the files '.bin' and '.idx' in that folder, and is taken where they exist."""
    if kind == "binidx":
        if all(Path(path + suffix).is_file() for suffix in (".bin", ".idx")):
            return
        if Path(path).is_dir():
            prefixes = sorted(str(p)[:-4] for p in Path(path).glob("*.idx"))
            raise UserInputError(f"{flag} {path} is a folder; binidx prefixes in it: "
                                 f"{', '.join(prefixes) or '(none)'}. Pass one of them.")
        for suffix in (".idx", ".bin"):
            if path.endswith(suffix) and Path(path[:-4] + ".bin").is_file() and Path(path[:-4] + ".idx").is_file():
                raise UserInputError(f"{flag} {path}: give the binidx prefix without {suffix}: {path[:-4]}")
        return  # the reader names the missing file
    check_input_file(flag, path, f"the file's path: {type_flag} {kind} reads {_DATA_FILES.get(kind, 'a file')}")


def read_npy_tokens(path: str) -> np.ndarray:
    """The token ids of a .npy file (--data_type numpy), memory-mapped: one 1-D array of integers. Anything else is
    refused in one line naming what the file holds: text or a pickle, an .npz archive, an array of another rank or
    dtype, a damaged header."""
    try:
        with open(path, "rb") as f:
            opening = f.read(len(_NPY_MAGIC))
            if opening == _NPY_MAGIC:
                f.seek(0)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
    except (ValueError, OSError, EOFError) as e:
        raise UserInputError(f"--data_file {path} is not a .npy array: its header cannot be read ({e}); save the "
                             f"token ids with numpy.save")
    if opening != _NPY_MAGIC:
        if opening.startswith(_ZIP_MAGIC):
            what = "is an .npz archive of several arrays"
        elif opening.startswith(_PICKLE_OPENING):
            what = "is a Python pickle, not a .npy array"
        else:
            what = f"is not a .npy array ({_looks_like(path)}, without numpy's .npy header)"
        raise UserInputError(f"--data_file {path} {what}; --data_type numpy reads one 1-D array of token ids saved "
                             f"with numpy.save (text: --data_type utf-8; JSON lines: preprocess_data.py, then "
                             f"--data_type binidx)")
    if dtype.hasobject or not np.issubdtype(dtype, np.integer):
        raise UserInputError(f"--data_file {path} holds {dtype} values; token data must be integers (save the ids as "
                             f"int32, or uint16 below 65536)")
    if len(shape) != 1:
        raise UserInputError(f"--data_file {path} holds a {len(shape)}-D array of shape {tuple(shape)}; --data_type "
                             f"numpy needs a 1-D array of token ids, the documents back to back (numpy.save the "
                             f"array's .reshape(-1) if its rows follow each other)")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserInputError(f"--data_file {path} is not a whole .npy array ({e}); save the token ids with "
                             f"numpy.save")
    return tokens


def _looks_like(path: str) -> str:
    """"it holds text" or "it holds binary data", from the file's first 4 KiB."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "it is empty"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            return "it holds binary data"
    return "it holds text"


def check_against_model(data: TokenData, cfg: TrainConfig, vocab_size: int) -> None:
    """Refuse data the model cannot train on: too short for ctx_len, or ids outside the vocabulary."""
    if data.tokens.ndim == 2:
        if data.tokens.shape[1] - 1 > cfg.ctx_len:
            raise UserInputError(f"--my_sample_len {data.tokens.shape[1]} gives samples of "
                                 f"{data.tokens.shape[1] - 1} tokens, more than --ctx_len {cfg.ctx_len}")
    elif data.documents is None and len(data.tokens) < cfg.ctx_len + 1:  # jsonl samples are whole documents
        raise UserInputError(f"{data.source} has {len(data.tokens)} tokens, but --ctx_len {cfg.ctx_len} needs at "
                             f"least ctx_len + 1 = {cfg.ctx_len + 1}; lower --ctx_len or use more data")
    if cfg.my_pile_stage > 0 and cfg.my_pile_stage != 4:
        pile_mode.check_magic_prime(cfg.magic_prime, len(data.tokens), cfg.ctx_len, cfg.my_pile_shift, data.source)
    check_token_ids(data.tokens.reshape(-1), data.source, vocab_size)
    if cfg.my_script_mask is not None:
        warm_up = cfg.initial_ctx_len is not None and cfg.initial_ctx_len < cfg.ctx_len
        check_some_window_trains(cfg.my_script_mask, cfg.initial_ctx_len if warm_up else cfg.ctx_len, cfg.ctx_len,
                                 data.binidx, len(data.tokens),
                                 f"--initial_ctx_len {cfg.initial_ctx_len}" if warm_up else "")
    if data.chats is not None and data.chats.tokenizer.vocab_size > vocab_size:
        raise UserInputError(f"--vocab_file {cfg.vocab_file} has {data.chats.tokenizer.vocab_size} tokens, more than "
                             f"the model's vocabulary of {vocab_size}; pass the tokenizer that made --data_file")


def check_token_ids(flat: np.ndarray, source: str, vocab_size: int) -> None:
    """Refuse token ids outside 0..vocab_size-1 in the 1-D `flat` (read a chunk at a time)."""
    largest = max((int(flat[i:i + _SCAN_CHUNK].max()) for i in range(0, len(flat), _SCAN_CHUNK)), default=0)
    if largest >= vocab_size:
        raise UserInputError(f"{source} contains token id {largest}, but the model's vocabulary has "
                             f"{vocab_size} entries (ids 0..{vocab_size - 1}); pass the --vocab_size of the "
                             f"tokenizer that made the data")
    smallest = min((int(flat[i:i + _SCAN_CHUNK].min()) for i in range(0, len(flat), _SCAN_CHUNK)), default=0)
    if smallest < 0:
        raise UserInputError(f"{source} contains the negative token id {smallest}")


def context_length(step: int, cfg: TrainConfig) -> int:
    """Sample length at optimizer step `step` of this run: the linear context warm-up of the fork.

    Grows from --initial_ctx_len to --ctx_len over --ctx_warmup_steps optimizer steps, constant within a step.
    """
    if cfg.initial_ctx_len is None or step >= cfg.ctx_warmup_steps:
        return cfg.ctx_len
    return int(step / cfg.ctx_warmup_steps * (cfg.ctx_len - cfg.initial_ctx_len) + cfg.initial_ctx_len)


class TrainingSamples(Dataset):
    """Random windows of the token stream (or rows, documents, chat samples). Index = epoch * len(self) +
    position within the epoch."""

    def __init__(self, data: TokenData, cfg: TrainConfig, seed: int, rank: int, world_size: int = 1):
        self.data = data
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch_len = cfg.epoch_steps * cfg.micro_bsz
        self.script_mask = parse_script_mask(cfg.my_script_mask) if cfg.my_script_mask else None

    def __len__(self) -> int:
        return self.epoch_len

    def step_of(self, index: int) -> int:
        """Optimizer step (of this run) that consumes sample `index`."""
        epoch, position = divmod(index, self.epoch_len)
        real_epoch = self.cfg.epoch_begin + epoch
        micro_batch = position // self.cfg.micro_bsz
        return (optimizer_steps_before(self.cfg, real_epoch) - optimizer_steps_before(self.cfg, self.cfg.epoch_begin)
                + micro_batch // accumulation_at(self.cfg, real_epoch))

    def __getitem__(self, index: int) -> tuple:
        epoch, position = divmod(index, self.epoch_len)
        real_epoch = self.cfg.epoch_begin + epoch
        rng = np.random.default_rng([self.seed, self.rank, real_epoch, position])
        if self.data.chats is not None and rng.random() < self.cfg.instruct_data_ratio:
            return self._chat_sample(rng, context_length(self.step_of(index), self.cfg) + 1)
        if self.data.tokens.ndim == 2:  # uint16 rows: any row, the last one included
            row = np.asarray(self.data.tokens[rng.integers(0, len(self.data.tokens))], dtype=np.int64)
            return torch.from_numpy(row[:-1].copy()), torch.from_numpy(row[1:].copy())
        length = context_length(self.step_of(index), self.cfg)
        # this sample's place in the run's sample stream over all ranks (the original's idx * world_size + rank)
        sample_number = (real_epoch * self.epoch_len + position) * self.world_size + self.rank
        if self.data.documents is not None:  # jsonl: the start of one document, up to length + 1 tokens
            ids, trained = self.data.documents.window(sample_number, self.seed, length + 1)
            return inputs_and_targets(ids, trained[1:])
        pile = self.cfg.my_pile_stage > 0 and self.cfg.my_pile_stage != 4
        if pile:
            start = pile_mode.magic_prime_start(sample_number, self.cfg.magic_prime, self.cfg.ctx_len,
                                               self.cfg.my_pile_shift)
        else:
            start = int(rng.integers(0, len(self.data.tokens) - length))  # window of length + 1 tokens
        if self.script_mask is None:
            return inputs_and_targets(self.data.tokens[start:start + length + 1])
        trained = trained_targets(start, length, *self.script_mask, self.data.binidx)
        redraws = 0 if pile else WINDOW_REDRAWS
        while not trained.any():  # a window that trains nothing would count as a loss of 0: another is drawn
            if redraws == 0:
                raise self._masked_whole(start, length, pile)
            redraws -= 1
            start = int(rng.integers(0, len(self.data.tokens) - length))
            trained = trained_targets(start, length, *self.script_mask, self.data.binidx)
        return inputs_and_targets(self.data.tokens[start:start + length + 1], trained)

    def _chat_sample(self, rng: np.random.Generator, n_tokens: int) -> tuple:
        """Chats of n_tokens tokens; chats in which the bot says nothing there would count as a loss of 0: others are
        drawn (up to WINDOW_REDRAWS times, from the sample's generator), and a sample with none stops the run."""
        for _ in range(WINDOW_REDRAWS + 1):
            ids, trained = self.data.chats.sample(rng, n_tokens)
            if trained[1:].any():
                return inputs_and_targets(ids, trained[1:])
        raise StopsTraining(f"--instruct_data_file {self.cfg.instruct_data_file}: the chats drawn for a sample of "
                            f"{n_tokens} tokens, and those drawn {WINDOW_REDRAWS} more times for it, hold no paragraph "
                            f"of the bot (the only ones trained) in their first {n_tokens} tokens: this sample would "
                            f"train nothing; use chats where the bot speaks sooner, or a longer --ctx_len")

    def _masked_whole(self, start: int, length: int, pile: bool) -> StopsTraining:
        """The stop of a run that drew a window whose every target is masked (and found no other)."""
        cut, prefix = self.script_mask
        end = self.data.binidx.document_bounds(start)[1] if cut else None
        why = (f"its document ends at token {end}" if cut else "") + (" and " if cut and prefix else "") + \
              (f"its first {prefix} targets are masked" if prefix else "")
        how = ("Pile mode's magic-prime sampling places this window" if pile
               else f"and {WINDOW_REDRAWS} more windows drawn for it were masked whole too")
        return StopsTraining(f"--my_script_mask {self.cfg.my_script_mask} masks every target of the window of "
                              f"tokens {start}..{start + length} of {self.data.source} ({why}), {how}: this sample "
                              f"would train nothing; use a smaller n, cut=0, or data with longer documents")


def inputs_and_targets(window, trained: Optional[np.ndarray] = None) -> tuple:
    """x = window[:-1], y = window[1:] (int64); targets whose `trained` flag is False become IGNORE_INDEX."""
    window = torch.from_numpy(np.array(window, dtype=np.int64))
    x, y = window[:-1], window[1:].clone()
    if trained is not None:
        y[~torch.from_numpy(np.asarray(trained, dtype=bool))] = IGNORE_INDEX
    return x, y


def samples_vary_in_length(cfg: TrainConfig) -> bool:
    """jsonl documents end where their text does; chat samples may be mixed with uint16 rows or jsonl documents."""
    return cfg.data_type == "jsonl" or bool(cfg.instruct_data_file)


def pad_batch(samples) -> tuple:
    """Batches samples of different lengths: x padded with token 0, y with IGNORE_INDEX (no loss)."""
    x = torch.nn.utils.rnn.pad_sequence([x for x, _ in samples], batch_first=True, padding_value=0)
    y = torch.nn.utils.rnn.pad_sequence([y for _, y in samples], batch_first=True, padding_value=IGNORE_INDEX)
    return x, y


class EpochSampler(Sampler):
    """Yields the global indices epoch * n + i of the current epoch; Lightning calls set_epoch.

    After a resume the first epoch starts at the sample where the stopped run left off.
    """

    def __init__(self, epoch_len: int):
        self.epoch_len = epoch_len
        self.epoch = 0
        self.resume_at = None  # (epoch, first position) for the epoch a resumed run continues

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_len

    def __iter__(self):
        start = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            start = self.resume_at[1]
        self.resume_at = None
        base = self.epoch * self.epoch_len
        return iter(range(base + start, base + self.epoch_len))


class ResumableLoader(DataLoader):
    """A DataLoader whose position goes into Lightning checkpoints (Lightning calls state_dict/load_state_dict).

    `position` (samples of the current epoch already trained on) is set by whoever saves the checkpoint:
    the loader itself cannot know it, since Lightning fetches batches ahead of training.
    """

    position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch = state["epoch"]
        self.sampler.resume_at = (state["epoch"], state["position"])


def build_loader(samples: Dataset, cfg: TrainConfig) -> DataLoader:
    """The samples, drawn in the training process itself (Lightning sets the sampler's epoch).

    No worker process: a sample is a slice of a memory-mapped file or a few chats, microseconds beside a training
    step, and a worker forked from the training process keeps, for as long as it lives, the old copy of every page
    the training changes after the fork: in a ZeRO-2 offload run, about the training process's whole memory at
    the fork (BENCHMARKS.md)."""
    return ResumableLoader(samples, batch_size=cfg.micro_bsz, sampler=EpochSampler(len(samples)), num_workers=0,
                           pin_memory=torch.cuda.is_available(), drop_last=True,
                           collate_fn=pad_batch if samples_vary_in_length(cfg) else None)
