"""Reading JSON lines: plain, .gz or .zst files, one document per line, with one clear reason per bad line.

Shared by preprocessing (src/data/preprocess.py) and the training readers of JSONL files (src/data/jsonl.py).
"""
import gzip
import io
import json
from pathlib import Path

from src.errors import UserInputError

READ_BUFFER_BYTES = 1 << 20  # of a decompressed .zst stream
UTF8_BOM = b"\xef\xbb\xbf"  # some editors start a file with it


def check_input_file(flag: str, path, what: str = "a file") -> None:
    """Refuse `path`, given to `flag`, unless it is a file: a folder, a named pipe or device (a reader would wait on
    it for ever) and a missing path are each named as such; `what` says what to give instead."""
    path = Path(path)
    if path.is_file():
        return
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a folder; give {what}")
    if path.exists():
        raise UserInputError(f"{flag} {path} is not a regular file (a named pipe or a device); give {what}")
    raise UserInputError(f"{flag} {path}: file not found")


def open_input(path: Path):
    """A binary stream of the JSONL text of `path` (.jsonl, .jsonl.zst, .jsonl.gz)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    raw = open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), READ_BUFFER_BYTES)
    return raw


def read_errors() -> tuple:
    """Exceptions that mean "this input file is damaged": I/O, gzip and zstd errors."""
    import zstandard

    return OSError, EOFError, zstandard.ZstdError


class BadLine(Exception):
    """A line that holds no usable document; `reason` groups such lines in the --skip-bad summary."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_record(raw: bytes, where: str, keys, choosing_keys: str) -> dict:
    """key -> text of one JSON line (a list of strings is joined with blank lines, as lm_dataformat does).

    `choosing_keys` ends the message for a line without a key: how the user picks the field (a flag).
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("invalid UTF-8", f"{where}: invalid UTF-8 (byte {e.start + 1} of the line)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("malformed JSON", f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        raise BadLine("not a JSON object", f"{where}: expected a JSON object such as {{\"text\": ...}}, got "
                                           f"{type(record).__name__}")
    texts = {}
    for key in keys:
        if key not in record:
            raise BadLine("missing key", f"{where}: no key {key!r} (keys: {', '.join(map(repr, record)) or 'none'}); "
                                         f"{choosing_keys}")
        text = record[key]
        if isinstance(text, list) and all(isinstance(part, str) for part in text):
            text = "\n\n".join(text)
        if not isinstance(text, str):
            raise BadLine("not text", f"{where}: {key!r} holds {type(text).__name__}, not a string")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadLine("invalid UTF-8", f"{where}: {key!r} contains the unpaired surrogate "
                                               f"{text[e.start]!r}, which is not text")
        texts[key] = text
    return texts
