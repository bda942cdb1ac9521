"""The binidx format: builder -> reader round trip, the .idx bytes parsed independently, atomic writes, checks."""
import struct

import numpy as np
import pytest

from src.data.binidx import MMapIndexedDataset, MMapIndexedDatasetBuilder, token_dtype
from src.errors import UserInputError

DOCUMENTS = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4], [3, 3]]


def write(prefix, documents=DOCUMENTS, dtype=np.uint16, batched=False):
    builder = MMapIndexedDatasetBuilder(prefix, dtype)
    if batched:  # all at once, as preprocess_data.py writes blocks
        builder.add_documents(np.concatenate(documents), [len(d) for d in documents])
    else:  # gpt-neox's calls, one item per document
        for doc in documents:
            builder.add_item(doc)
            builder.end_document()
    builder.finalize()
    return MMapIndexedDataset(prefix)


def parse_idx(path):
    """The .idx bytes read field by field with struct, in gpt-neox's MMapIndexedDataset layout (little-endian):
    magic b"MMIDIDX\\x00\\x00", version u64 = 1, dtype code u8, item count u64, document count u64, then sizes
    int32[items], byte pointers int64[items], document starts int64[documents]."""
    raw = path.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    length, doc_count = struct.unpack_from("<QQ", raw, 18)
    sizes = struct.unpack_from(f"<{length}i", raw, 34)
    pointers = struct.unpack_from(f"<{length}q", raw, 34 + 4 * length)
    doc_idx = struct.unpack_from(f"<{doc_count}q", raw, 34 + 12 * length)
    assert len(raw) == 34 + 12 * length + 8 * doc_count
    return version, code, sizes, pointers, doc_idx


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
@pytest.mark.parametrize("batched", [False, True])
def test_idx_bytes_match_the_gpt_neox_layout(tmp_path, dtype, code, batched):
    write(tmp_path / "d", dtype=dtype, batched=batched)
    version, found_code, sizes, pointers, doc_idx = parse_idx(tmp_path / "d.idx")
    itemsize = np.dtype(dtype).itemsize
    assert (version, found_code) == (1, code)
    assert sizes == (3, 1, 6, 2)
    assert pointers == (0, 3 * itemsize, 4 * itemsize, 10 * itemsize)
    assert doc_idx == (0, 1, 2, 3, 4)  # starts with 0, then the item count after each document
    # .bin: the tokens back to back, little-endian, no header
    expected = b"".join(np.asarray(d, dtype=np.dtype(dtype).newbyteorder("<")).tobytes() for d in DOCUMENTS)
    assert (tmp_path / "d.bin").read_bytes() == expected


def test_both_ways_of_adding_documents_write_identical_files(tmp_path):
    write(tmp_path / "one", batched=False)
    write(tmp_path / "many", batched=True)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"many{suffix}").read_bytes()


def test_round_trip(tmp_path):
    data = write(tmp_path / "d", dtype=np.int32)
    assert len(data) == 4 and data.dtype == np.int32
    assert [list(data[i]) for i in range(4)] == DOCUMENTS
    assert list(data.get(2, offset=1, length=3)) == [8, 7, 6]
    assert list(data.tokens) == sum(DOCUMENTS, [])


def test_document_bounds_cover_every_position_including_the_last_item(tmp_path):
    data = write(tmp_path / "d")
    bounds = [data.document_bounds(p) for p in range(12)]
    assert bounds == [(0, 3)] * 3 + [(3, 4)] + [(4, 10)] * 6 + [(10, 12)] * 2


def test_empty_dataset(tmp_path):
    data = write(tmp_path / "e", documents=[])
    assert len(data) == 0 and len(data.tokens) == 0
    assert parse_idx(tmp_path / "e.idx")[4] == (0,)


def test_nothing_appears_before_finalize_and_abort_keeps_old_files(tmp_path):
    write(tmp_path / "d")
    old = {s: (tmp_path / f"d{s}").read_bytes() for s in (".bin", ".idx")}
    builder = MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16)
    builder.add_item([1, 2, 3, 4, 5])
    builder.end_document()
    assert {s: (tmp_path / f"d{s}").read_bytes() for s in (".bin", ".idx")} == old
    builder.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert {s: (tmp_path / f"d{s}").read_bytes() for s in (".bin", ".idx")} == old


def test_sizes_must_match_the_tokens(tmp_path):
    builder = MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16)
    with pytest.raises(ValueError, match="sizes add up to 3"):
        builder.add_documents(np.arange(4), [1, 2])
    builder.abort()


def test_token_dtype_follows_the_vocabulary_size():
    assert token_dtype(50277) == np.uint16 and token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32 and token_dtype(65536) == np.int32


@pytest.mark.parametrize("damage,message", [
    (lambda idx, bin_: idx.write_bytes(b"TNTIDX\x00\x00" + idx.read_bytes()[8:]), "wrong magic"),
    (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8]), "truncated or damaged"),
    (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "the .bin is truncated"),
    (lambda idx, bin_: bin_.unlink(), "d.bin not found"),
])
def test_damaged_files_are_refused_with_the_reason(tmp_path, damage, message):
    write(tmp_path / "d")
    damage(tmp_path / "d.idx", tmp_path / "d.bin")
    with pytest.raises(UserInputError, match=message):
        MMapIndexedDataset(tmp_path / "d")
