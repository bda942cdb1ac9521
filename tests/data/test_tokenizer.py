"""Tokenizers: the 20B json, our World trie against the rwkv pip package, GPT-2 BPE, char level, bad files."""
import json
import random
from pathlib import Path

import pytest

from helpers import TOKENIZER_20B_PARTS, WORLD_VOCAB_PARTS, package_file
from src.errors import UserInputError
from src.data.tokenizer import (
    CharLevelTokenizer,
    HFTokenizer,
    RWKVTokenizer,
    TokenizerSpec,
    _read_special_tokens,
    char_spans_of_bytes,
    gpt2_bpe,
    hf_gpt2,
    locate_tokenizer_file,
    tokenizer_for_file,
)

TOKENIZER_20B = Path(package_file(*TOKENIZER_20B_PARTS))
WORLD_VOCAB = Path(package_file(*WORLD_VOCAB_PARTS))

VARIED_TEXTS = [
    "",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Bob: hi\n\nAlice: 你好，世界。今天天气很好！\n\n",
    "tabs\tand  double  spaces   and\r\nwindows lines" + " " * 300,
    "emoji 🙂🙃👍🏽 and accents: émigré, naïve, Ångström, ß",
    "code: def f(x):\n    return x ** 2  # comment\n" * 3,
    "control \x00\x01\x7f chars and \u200b zero width and \ufeff BOM",
    "العربية русский 日本語のテキスト 한국어",
    "################################################################################--------" * 2,
]


def random_text(rng: random.Random, length: int) -> str:
    """Characters from every UTF-8 length class (1 to 4 bytes), no surrogates."""
    ranges = [(0x20, 0x7E), (0x0A, 0x0A), (0xA0, 0x7FF), (0x4E00, 0x9FFF), (0xE000, 0xFFFD), (0x1F300, 0x1FAFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


@pytest.fixture(scope="module")
def world():
    return RWKVTokenizer(WORLD_VOCAB)


def test_20b_tokenizer_ids():
    tokenizer = HFTokenizer.from_file(TOKENIZER_20B)
    assert tokenizer.encode("\nIn a shocking finding, scientist discovered") == \
        [187, 688, 247, 29103, 4560, 13, 20687, 6888]
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (50277, 0)
    ids, spans = tokenizer.encode_with_offsets("Bob: hi")
    assert len(ids) == len(spans) and spans[0] == (0, 3)


def test_world_trie_matches_the_rwkv_pip_package(world):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    reference = TRIE_TOKENIZER(str(WORLD_VOCAB))
    rng = random.Random(0)
    texts = VARIED_TEXTS + [random_text(rng, rng.randint(1, 300)) for _ in range(40)]
    texts.append(Path(__file__).read_text(encoding="utf-8"))
    for text in texts:
        assert world.encode(text) == reference.encode(text), text[:40]
        assert world.decode(world.encode(text)) == text.encode("utf-8")
    assert (world.vocab_size, world.eod_id) == (65536, 0)


def test_world_offsets_point_at_the_characters_of_each_token(world):
    for text in VARIED_TEXTS[1:]:
        ids, spans = world.encode_with_offsets(text)
        assert ids == world.encode(text)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        for token_id, (start, end) in zip(ids, spans):
            # a token's bytes lie inside the UTF-8 of its characters (a token may hold part of a character)
            assert world.token_bytes[token_id] in text[start:end].encode("utf-8")


def test_char_spans_of_bytes():
    text = "a你🙂b"  # 1 + 3 + 4 + 1 bytes
    assert char_spans_of_bytes(text, [(0, 1), (1, 4), (4, 6), (6, 8), (8, 9)]) == \
        [(0, 1), (1, 2), (2, 3), (2, 3), (3, 4)]


def test_special_tokens_are_matched_before_the_vocabulary(tmp_path, world):
    special = tmp_path / "st_dict.json"
    special.write_text(json.dumps({"<|B|>": 65531, "<|end|>": 65532, "<|C|>": 65533}))
    tokenizer = RWKVTokenizer(WORLD_VOCAB, special)
    text = "<|B|>Alice: hi<|end|>\n<|C|>"
    ids, spans = tokenizer.encode_with_offsets(text)
    assert ids == [65531, *world.encode("Alice: hi"), 65532, *world.encode("\n"), 65533]
    assert ids == tokenizer.encode(text)
    assert [text[s:e] for s, e in spans][0] == "<|B|>" and text[spans[-1][0]:spans[-1][1]] == "<|C|>"
    assert tokenizer.decode(ids) == text.encode("utf-8")


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "must be a JSON object"),
    ('{"<|B|>": 70000}', "ids must be integers"),
    ('{"<|B|>": 33}', "already the vocabulary token"),
    ("{not json", "is not JSON"),
])
def test_bad_special_tokens_files(tmp_path, world, content, message):
    path = tmp_path / "st.json"
    path.write_text(content)
    with pytest.raises(UserInputError, match=message):
        _read_special_tokens(path, world)


def test_char_level_tokenizer_is_utf8_bytes():
    tokenizer = CharLevelTokenizer()
    assert tokenizer.encode("aé") == [97, 0xC3, 0xA9]
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (512, 0)
    assert tokenizer.encode_with_offsets("aé")[1] == [(0, 1), (1, 2), (1, 2)]


def write_tiny_gpt2_files(folder: Path):
    """A byte-level BPE vocabulary with merges that build "hello" and "Ġworld" (Ġ is the space byte)."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "he l", "hel l", "hell o", "w o", "wo r", "wor l", "worl d", "Ġ world"]
    tokens += [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return {t: i for i, t in enumerate(tokens)}


def test_gpt2_bpe_from_vocab_and_merges(tmp_path):
    vocab = write_tiny_gpt2_files(tmp_path)
    bpe = gpt2_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert bpe.encode("hello world") == [vocab["hello"], vocab["Ġworld"]]
    assert bpe.vocab_size == len(vocab) and bpe.eod_id == vocab["<|endoftext|>"]
    assert len(bpe.encode("<|endoftext|>")) > 1  # plain text for GPT2BPETokenizer
    # HFGPT2Tokenizer: same merges, <|endoftext|> is one special token and <|padding|> is appended
    for hf in (hf_gpt2(tmp_path / "vocab.json", tmp_path / "merges.txt"), hf_gpt2(tmp_path)):
        assert hf.encode("hello world<|endoftext|>") == [vocab["hello"], vocab["Ġworld"], vocab["<|endoftext|>"]]
        assert hf.vocab_size == len(vocab) + 1


def test_tokenizer_chosen_by_file_suffix(tmp_path):
    assert isinstance(tokenizer_for_file(TOKENIZER_20B), HFTokenizer)
    with pytest.raises(UserInputError, match="expected a .json"):
        tokenizer_for_file(tmp_path / "vocab.model")


@pytest.mark.parametrize("spec,message", [
    (TokenizerSpec("HFTokenizer", "missing.json"), "missing.json: file not found"),
    (TokenizerSpec("HFTokenizer"), "HFTokenizer needs --vocab-file"),
    (TokenizerSpec("RWKVTokenizer", str(TOKENIZER_20B)), "is not '<id> <literal> <length>'"),
    (TokenizerSpec("GPT2BPETokenizer", "vocab.json"), "needs --vocab-file vocab.json and --merge-file"),
    (TokenizerSpec("HFGPT2Tokenizer"), "nothing is downloaded"),
])
def test_bad_tokenizer_files_name_the_file_and_the_fix(spec, message):
    with pytest.raises(UserInputError, match=message.replace("|", r"\|")):
        spec.build()


def test_a_file_that_is_not_a_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(UserInputError, match="is not a Hugging Face tokenizer.json"):
        HFTokenizer.from_file(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(UserInputError, match="cannot be read as UTF-8"):
        HFTokenizer.from_file(path)


def test_packaged_tokenizer_names_find_the_installed_copies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh folder: no tokenizer file here
    assert locate_tokenizer_file("20B_tokenizer.json") == str(TOKENIZER_20B)
    assert locate_tokenizer_file("rwkv_vocab_v20230424.txt") == str(WORLD_VOCAB)
    assert tokenizer_for_file("20B_tokenizer.json").vocab_size == 50277
    assert TokenizerSpec("HFTokenizer", "20B_tokenizer.json").build().encode("Hello") == \
        HFTokenizer.from_file(TOKENIZER_20B).encode("Hello")
    assert locate_tokenizer_file("data/20B_tokenizer.json") == "data/20B_tokenizer.json"  # a path is taken as given
    with pytest.raises(UserInputError, match="data/20B_tokenizer.json: file not found"):
        tokenizer_for_file("data/20B_tokenizer.json")
    (tmp_path / "20B_tokenizer.json").write_text("{}")
    assert locate_tokenizer_file("20B_tokenizer.json") == "20B_tokenizer.json"  # a file of that name here wins
