"""The gpt-neox MMapIndexedDataset format (.bin + .idx), byte for byte.

.idx, little-endian:
    0   9 bytes   magic b"MMIDIDX\\x00\\x00"
    9   u64       version = 1
    17  u8        dtype code (DTYPES)
    18  u64       len: number of items (sequences)
    26  u64       doc_count: length of doc_idx (documents + 1)
    34  i32[len]  sizes: tokens per item
        i64[len]  pointers: byte offset of each item in .bin (running sum of size * itemsize)
        i64[doc_count] doc_idx: item index where each document starts, then the item count
.bin: the items' tokens concatenated, no header.
"""
import functools
import os
import struct
from pathlib import Path

import numpy as np

from src.io.atomic import check_unchanged, discard, publish, temporary_path
from src.errors import UserInputError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, len, doc_count: 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def token_dtype(vocab_size: int):
    """uint16 for vocabularies below 65500 (the gpt-neox rule), int32 otherwise."""
    return np.uint16 if vocab_size < 65500 else np.int32


class MMapIndexedDataset:
    """Read-only view of `{prefix}.bin` / `{prefix}.idx`, validated against each other."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise UserInputError(f"binidx data: {path} not found (--data_file takes the prefix without "
                                     f".bin/.idx, e.g. data/chatgal_text_document)")
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:9] != MAGIC:
            raise UserInputError(f"{idx_path} is not an MMapIndexedDataset index (wrong magic); preprocess the data "
                                 f"with preprocess_data.py --dataset-impl mmap")
        magic, version, code, length, doc_count = HEADER.unpack(head)
        if version != VERSION:
            raise UserInputError(f"{idx_path}: index version {version}, only version {VERSION} is known")
        if code not in DTYPES:
            raise UserInputError(f"{idx_path}: unknown dtype code {code}")
        if not np.issubdtype(DTYPES[code], np.integer):
            raise UserInputError(f"{idx_path} says its tokens are {np.dtype(DTYPES[code]).name} (dtype code {code}); "
                                 f"token ids are integers: preprocess the data with preprocess_data.py")
        expected = HEADER.size + 12 * length + 8 * doc_count
        if idx_size != expected:
            raise UserInputError(f"{idx_path} is {idx_size} bytes but its header ({length} items, {doc_count} "
                                 f"doc_idx entries) needs {expected}: the file is truncated or damaged")
        self.dtype = np.dtype(DTYPES[code])
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(index, dtype=np.int32, count=length, offset=HEADER.size)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=length, offset=HEADER.size + 4 * length)
        self.doc_idx = np.frombuffer(index, dtype=np.int64, count=doc_count, offset=HEADER.size + 12 * length)
        bin_size = bin_path.stat().st_size
        needed = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if length else 0
        if bin_size < needed:
            raise UserInputError(f"{bin_path} is {bin_size} bytes but {idx_path} points to {needed}: the .bin is "
                                 f"truncated or belongs to another index")
        if bin_size > needed:  # training windows would be drawn from bytes no item describes
            raise UserInputError(f"{bin_path} is {bin_size} bytes but {idx_path} describes only {needed}: the .bin "
                                 f"was appended to or belongs to another index; preprocess the data again")
        self.tokens = (np.memmap(bin_path, mode="r", dtype=self.dtype, shape=(bin_size // self.dtype.itemsize,))
                       if bin_size else np.zeros(0, self.dtype))
        self.bin_path = bin_path

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int = None) -> np.ndarray:
        """Tokens of item i from element `offset`, `length` of them (default: to the item's end)."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        length = int(self.sizes[i]) - offset if length is None else length
        return self.tokens[start:start + length]

    @functools.cached_property
    def item_starts(self) -> np.ndarray:
        """Token position of each item in the flat stream."""
        return self.pointers // self.dtype.itemsize

    def document_bounds(self, position: int) -> tuple:
        """(start, end) token positions of the item that holds token `position` of the flat stream."""
        starts = self.item_starts
        item = int(np.searchsorted(starts, position, side="right")) - 1
        item = min(max(item, 0), len(starts) - 1)
        return int(starts[item]), int(starts[item]) + int(self.sizes[item])


class MMapIndexedDatasetBuilder:
    """Writes `{prefix}.bin` and `{prefix}.idx`. Both appear only when `finalize` succeeds.

    gpt-neox's preprocessor adds one item per document (`add_item` then `end_document`); `add_documents`
    does the same for many documents at once.
    """

    def __init__(self, prefix, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"binidx cannot store dtype {self.dtype}")
        self._bin_tmp = temporary_path(self.prefix + ".bin")
        self._idx_tmp = temporary_path(self.prefix + ".idx")
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = []  # int32 arrays: tokens per item
        self._doc_starts = [np.zeros(1, np.int64)]  # int64 arrays: doc_idx entries after the leading 0
        self.items = 0
        self.tokens = 0
        self.bin_bytes = 0  # of tokens given to the .bin so far, the write under way included (for a full disk)

    def add_item(self, tokens) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self.bin_bytes += array.nbytes
        self._bin.write(array.tobytes(order="C"))
        self._sizes.append(np.array([len(array)], np.int32))
        self.items += 1
        self.tokens += len(array)

    def end_document(self) -> None:
        self._doc_starts.append(np.array([self.items], np.int64))

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Documents given as their concatenated tokens and their lengths: one item each."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        sizes = np.asarray(sizes, dtype=np.int32)
        if int(sizes.sum(dtype=np.int64)) != len(tokens):
            raise ValueError(f"sizes add up to {int(sizes.sum())} tokens, but {len(tokens)} were given")
        self.bin_bytes += tokens.nbytes
        self._bin.write(tokens.data)
        self._sizes.append(sizes)
        self._doc_starts.append(self.items + 1 + np.arange(len(sizes), dtype=np.int64))
        self.items += len(sizes)
        self.tokens += len(tokens)

    def output_bytes(self) -> int:
        """The bytes of the .bin and .idx of what was added so far (the write under way included)."""
        return self.bin_bytes + HEADER.size + 12 * self.items + 8 * sum(map(len, self._doc_starts))

    def finalize(self, replace=True) -> None:
        """Write the index and publish both files. `replace`: True replaces the files there; False creates them only,
        where no file appeared meanwhile; a pair of atomic.Found (.bin, .idx), what the check before the work found,
        replaces just that: if either file appeared or changed meanwhile, both are left as they are and this output is
        discarded with one line."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        doc_idx = np.concatenate(self._doc_starts)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, CODES[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        if isinstance(replace, tuple):
            for found in replace:
                check_unchanged(found, found.path, self._bin_tmp, self._idx_tmp)
            replace = True
        if replace:  # the old index goes first: an interruption between the renames leaves no .idx, not a wrong pair
            Path(self.prefix + ".idx").unlink(missing_ok=True)
        publish(self._bin_tmp, self.prefix + ".bin", replace)
        publish(self._idx_tmp, self.prefix + ".idx", replace)

    def abort(self) -> None:
        """Drop the partial output (after an error or Ctrl+C); existing .bin/.idx files stay as they were."""
        if not self._bin.closed:
            self._bin.close()
        discard(self._bin_tmp)
        discard(self._idx_tmp)
