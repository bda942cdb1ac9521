"""--data_type jsonl: each JSON line is one document; a sample is the beginning of one document.

Documents ({"text": ...} per line; a list of strings is joined with blank lines) are tokenized once at
start-up with the tokenizer of --vocab_file. A sample holds up to L+1 tokens of its document (L = ctx_len,
or the current length of the context warm-up): x = tokens[:-1], y = tokens[1:]. Shorter documents give
shorter samples, which the batch pads (x with token 0, y with "no target").

Sample s of the run, counted over all ranks (s = index * world_size + rank), takes document s mod n of the
training order, so the ranks share out the documents and every pass visits each once. The order is the
file's, or by length (--train_data_sort short_first / long_first), or a fresh permutation in every pass
(shuffle) drawn from the run's seed.

--select_name NAME trains only what NAME says: in every paragraph (paragraphs are separated by a blank line)
that starts with "NAME:", the text after the colon through the blank line that ends the paragraph, so the
model also learns when to stop. A target is trained when its characters overlap such a span. A document whose
shortest sample NAME says nothing in is left out, with a note: its samples would train nothing.
"""
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from src.errors import UserInputError
from src.data.jsonl_lines import UTF8_BOM, BadLine, open_input, parse_record, read_errors
from src.data.tokenizer import Tokenizer, tokenizer_for_file

# the tokenizer files users pass as --vocab_file, named by the refusals that ask for one
TOKENIZER_HINT = "20B_tokenizer.json (Pile/Raven/Novel models) or rwkv_vocab_v20230424.txt (World models)"


def check_jsonl_flags(cfg) -> None:
    """The flags of jsonl documents go with --data_type jsonl, before anything is read (cfg: train.py's flags; reads
    only --data_type, --vocab_file, --valid_data_type, --instruct_data_file, --select_name, --train_split_ratio and
    --train_data_sort)."""
    jsonl_only = {"select_name": cfg.select_name, "train_split_ratio": cfg.train_split_ratio,
                  "train_data_sort": cfg.train_data_sort}
    if cfg.data_type == "jsonl" and not cfg.vocab_file:
        raise UserInputError(f"--data_type jsonl needs --vocab_file, the tokenizer of the text: {TOKENIZER_HINT}.")
    if cfg.vocab_file and "jsonl" not in (cfg.data_type, cfg.valid_data_type) and not cfg.instruct_data_file:
        raise UserInputError(f"--vocab_file applies to --data_type jsonl and --instruct_data_file only (and to "
                             f"--valid_data_type jsonl; this run reads {cfg.data_type}).")
    for name, value in jsonl_only.items():
        if value is not None and cfg.data_type != "jsonl":
            raise UserInputError(f"--{name} applies to --data_type jsonl only (this run reads {cfg.data_type}).")
    if cfg.select_name == "":
        raise UserInputError("--select_name needs the speaker's name, as written before the colon.")


@dataclass
class Documents:
    tokens: np.ndarray  # int32: every document's token ids, back to back
    trained: np.ndarray  # bool per token: whether it is trained when it is a target
    starts: np.ndarray  # int64, n + 1 entries: document k is tokens[starts[k]:starts[k + 1]]
    sort: Optional[str] = None  # --train_data_sort
    note: str = ""  # a line for the user: documents left out

    def __len__(self) -> int:
        return len(self.starts) - 1

    @functools.cached_property
    def by_length(self) -> np.ndarray:
        """Document numbers from shortest to longest (stable: equal lengths keep the file order)."""
        return np.argsort(np.diff(self.starts), kind="stable")

    @functools.lru_cache(maxsize=2)
    def _permutation(self, seed: int, pass_number: int) -> np.ndarray:
        return np.random.default_rng([seed, pass_number]).permutation(len(self))

    def document_of(self, sample_number: int, seed: int) -> int:
        pass_number, position = divmod(sample_number, len(self))
        if self.sort == "shuffle":
            return int(self._permutation(seed, pass_number)[position])
        if self.sort == "short_first":
            return int(self.by_length[position])
        if self.sort == "long_first":
            return int(self.by_length[len(self) - 1 - position])
        return position

    def window(self, sample_number: int, seed: int, max_tokens: int) -> tuple:
        """(token ids, trained flags) of the first max_tokens tokens of the sample's document."""
        k = self.document_of(sample_number, seed)
        start = int(self.starts[k])
        end = min(int(self.starts[k + 1]), start + max_tokens)
        return self.tokens[start:end], self.trained[start:end]

    __hash__ = object.__hash__  # for the lru_cache on a method


def speaker_spans(text: str, name: str) -> list:
    """Character ranges of what `name` says: after "name:" at a paragraph start, through the paragraph's end."""
    pattern = re.compile(rf"(?:\A|(?<=\n\n)){re.escape(name)}:(.*?(?:\n\n|\Z))", re.DOTALL)
    return [match.span(1) for match in pattern.finditer(text)]


def speaker_mask(text: str, token_spans, name: str) -> np.ndarray:
    """Per token: do its characters overlap what `name` says? (A token with an empty span counts its position.)"""
    said = np.zeros(len(text) + 1, dtype=bool)
    for start, end in speaker_spans(text, name):
        said[start:end] = True
    said_before = np.concatenate([[0], np.cumsum(said)])  # said_before[i] = characters said in text[:i]
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    return np.where(ends > starts, said_before[ends] - said_before[starts] > 0, said[starts])


def read_texts(path: Path, flag: str = "--data_file") -> list:
    """The "text" of every line of a .jsonl (.zst, .gz) file given by `flag`; a bad line stops with file:line."""
    texts = []
    try:
        with open_input(path) as stream:
            for number, raw in enumerate(stream, start=1):
                if number == 1:
                    raw = raw.removeprefix(UTF8_BOM)
                if not raw.strip():
                    continue
                try:
                    record = parse_record(raw.rstrip(b"\r\n"), f"{path}:{number}", ("text",),
                                          choosing_keys='every line needs its document under "text"')
                    texts.append(record["text"])
                except BadLine as bad:
                    raise UserInputError(f"{flag} {bad}")
    except read_errors() as e:
        raise UserInputError(f"{flag} {path} cannot be read ({type(e).__name__}: {e})")
    return texts


def tokenize_documents(texts, tokenizer: Tokenizer, select_name: Optional[str], shortest_sample: int) -> tuple:
    """(tokens, trained, starts, left out) of the documents with at least two tokens (one token holds no target) whose
    every sample trains a target: a sample is the start of its document, so under `select_name` a document none of
    whose first `shortest_sample` tokens that speaker says is left out (it would train nothing); `left out` counts
    those."""
    pieces, flags, lengths, left_out = [], [], [], 0
    for text in texts:
        if select_name:
            ids, spans = tokenizer.encode_with_offsets(text)
            trained = speaker_mask(text, spans, select_name)
        else:
            ids = tokenizer.encode(text)
            trained = np.ones(len(ids), dtype=bool)
        if len(ids) < 2:
            continue
        if not trained[1:shortest_sample].any():  # the first token is never a target
            left_out += 1
            continue
        pieces.append(np.asarray(ids, dtype=np.int32))
        flags.append(trained)
        lengths.append(len(ids))
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    trained = np.concatenate(flags) if flags else np.zeros(0, bool)
    return tokens, trained, starts, left_out


def load_documents(cfg) -> Documents:
    """The documents of --data_file (cfg: src/data/dataset.py DataFile; reads only --data_file, --vocab_file,
    --train_split_ratio, --initial_ctx_len, --ctx_len, --select_name and --train_data_sort)."""
    path = Path(cfg.data_file)
    tokenizer = tokenizer_for_file(cfg.vocab_file)
    texts = read_texts(path)
    if cfg.train_split_ratio is not None:
        texts = texts[:int(len(texts) * cfg.train_split_ratio)]
    shortest = (cfg.initial_ctx_len or cfg.ctx_len) + 1  # tokens of the shortest sample (the context warm-up's first)
    tokens, trained, starts, left_out = tokenize_documents(texts, tokenizer, cfg.select_name, shortest)
    unsaid = (f"by '{cfg.select_name}:' in the first {shortest:,} tokens (the shortest sample"
              f"{', at --initial_ctx_len' if cfg.initial_ctx_len else ''})")
    if len(starts) == 1 and left_out:
        raise UserInputError(f"--select_name {cfg.select_name}: no document of {path} has a paragraph {unsaid}, so "
                             f"nothing would be trained")
    if len(starts) == 1:
        raise UserInputError(f"--data_file {path} has no document of two or more tokens"
                             f"{' in the first --train_split_ratio of it' if cfg.train_split_ratio else ''}")
    note = (f"Note: --select_name {cfg.select_name}: {left_out:,} of the {len(texts):,} documents of {path} have no "
            f"paragraph {unsaid} and are left out: their samples would train nothing." if left_out else "")
    return Documents(tokens, trained, starts, cfg.train_data_sort, note)
