"""--instruct_data_file: training samples built from chats, mixed into the other data (the fork's instruct mixing).

With probability --instruct_data_ratio a training sample is built from random chats of the file instead of the
usual window, row or document. A chat is one JSON line {"text": ...} whose paragraphs (separated by blank
lines) start with a speaker tag: "Bob:" for the user, "Alice:" for the bot. Chats are drawn one after another
and joined with blank lines until the sample holds L+1 tokens (L = ctx_len, or the current length of the
context warm-up; the last chat is cut there). Only what the bot says is trained: its paragraphs after the tag,
through the closing blank line (as --select_name does).

Speakers: the chats run under a name pair (user, bot). Each pair opens with a system line (a random one of
the templates, {user} and {bot} filled in) and lasts until 10 speaker tags have been replaced, then a new pair
and a new system line follow. Without --names_data_file the pair is always (Bob, Alice): the tags stay as
written. With it, a pair is drawn by weight: a document by "doc_weights", then two different names of that
document by their weights, the user first. Its optional "system_lines" replaces the original's three Chinese
templates ([] = no system line).

Every draw (instruct or not, which chats, names and system lines) comes from the sample's own generator
(src/data/dataset.py), so a sample is a pure function of (seed, rank, epoch, index).
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from src.errors import UserInputError
from src.data.jsonl import TOKENIZER_HINT, read_texts, speaker_mask, speaker_spans
from src.data.types import CHARACTER_DATA_TYPES
from src.data.jsonl_lines import check_input_file
from src.data.tokenizer import Tokenizer, tokenizer_for_file

USER_TAG, BOT_TAG = "Bob", "Alice"  # the speaker tags the chats are written with
TAGS_PER_NAME_PAIR = 10  # replaced speaker tags after which a new name pair is drawn (the fork's max_replace)
# The fork's hard-coded system lines (its names file carried none): "{user} is talking with {bot}; {bot} is very
# clever and is helping {user} solve a problem", "{bot} is a knowledgeable expert talking with {user}", "{bot}
# knows mathematics, physics and every other subject and often helps {user}". The outer braces are literal.
DEFAULT_SYSTEM_LINES = (
    "{{user}正在和{bot}交流，{bot}非常聪明，正在帮助{user}解决问题}",
    "{{bot}是一个知识渊博的专家，正在和{user}交谈。}",
    "{{bot}懂得数学、物理等各种学科，经常帮助{user}}",
)
_SPEAKER_TAG = re.compile(rf"^({USER_TAG}|{BOT_TAG}):", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{(user|bot)\}")
_NAMES_EXAMPLE = '{"doc_names": [{"Ann": 3, "Kim": 1}], "doc_weights": [1]}'


def rename_speakers(chat: str, user: str, bot: str) -> tuple:
    """(chat with the user's and the bot's tags at line starts renamed, number of tags renamed). One pass, so a
    user named Alice is not renamed again as the bot."""
    names = {USER_TAG: user, BOT_TAG: bot}
    return _SPEAKER_TAG.subn(lambda tag: names[tag.group(1)] + ":", chat)


def fill_system_line(template: str, user: str, bot: str) -> str:
    names = {"user": user, "bot": bot}
    return _PLACEHOLDER.sub(lambda placeholder: names[placeholder.group(1)], template)


@dataclass
class NamePairs:
    """Speaker name pairs drawn by weight: a document, then two different names of it."""
    names: list  # per document: its names (each document has at least two)
    weights: list  # per document: float array, one positive weight per name
    document_probabilities: np.ndarray

    def draw(self, rng: np.random.Generator) -> tuple:
        """(user, bot)."""
        document = rng.choice(len(self.names), p=self.document_probabilities)
        weights = self.weights[document].copy()
        user = rng.choice(len(weights), p=weights / weights.sum())
        weights[user] = 0  # the bot is someone else
        bot = rng.choice(len(weights), p=weights / weights.sum())
        return self.names[document][user], self.names[document][bot]


@dataclass
class Chats:
    texts: list  # the chats, stripped
    tokenizer: Tokenizer
    pairs: Optional[NamePairs]  # None: the tags stay as written
    system_lines: tuple

    def draw_pair(self, rng: np.random.Generator) -> tuple:
        return self.pairs.draw(rng) if self.pairs is not None else (USER_TAG, BOT_TAG)

    def opening(self, rng: np.random.Generator, user: str, bot: str) -> str:
        """The system line that opens a name pair's chats, with its blank line ("" without system lines)."""
        if not self.system_lines:
            return ""
        return fill_system_line(self.system_lines[rng.integers(len(self.system_lines))], user, bot) + "\n\n"

    def sample(self, rng: np.random.Generator, n_tokens: int) -> tuple:
        """(n_tokens token ids, trained flag per token) of random chats joined with blank lines."""
        pieces, flags, count, tags_left = [], [], 0, 0
        while count < n_tokens:
            text = ""
            if tags_left <= 0:
                (user, bot), tags_left = self.draw_pair(rng), TAGS_PER_NAME_PAIR
                text = self.opening(rng, user, bot)
            chat, tags = rename_speakers(self.texts[rng.integers(len(self.texts))], user, bot)
            tags_left -= tags
            text += chat + "\n\n"  # every piece ends a paragraph, so the next one starts with a speaker tag
            ids, spans = self.tokenizer.encode_with_offsets(text)
            pieces.append(np.asarray(ids, dtype=np.int64))
            flags.append(speaker_mask(text, spans, bot))
            count += len(ids)
        return np.concatenate(pieces)[:n_tokens], np.concatenate(flags)[:n_tokens]


def check_instruct_flags(cfg) -> None:
    """--instruct_data_file, --instruct_data_ratio and --names_data_file go together, on tokenized data (cfg:
    train.py's flags; reads only those three, --data_type and --vocab_file)."""
    ratio = cfg.instruct_data_ratio
    if not cfg.instruct_data_file:
        if ratio > 0:
            raise UserInputError("--instruct_data_ratio needs --instruct_data_file, the chats to build samples from.")
        if cfg.names_data_file is not None:
            raise UserInputError("--names_data_file names the speakers of --instruct_data_file chats; add "
                                 "--instruct_data_file or remove --names_data_file.")
        return
    if ratio == 0:
        raise UserInputError("--instruct_data_file needs --instruct_data_ratio P (0 < P <= 1), the share of samples "
                             "built from its chats.")
    if cfg.data_type in CHARACTER_DATA_TYPES:
        raise UserInputError(f"--instruct_data_file mixes tokenized chats into token data (binidx, numpy, uint16, "
                             f"jsonl); --data_type {cfg.data_type} numbers the characters of its own text.")
    if not cfg.vocab_file:
        raise UserInputError(f"--instruct_data_file needs --vocab_file, the tokenizer of the chats: "
                             f"{TOKENIZER_HINT}.")


def load_chats(cfg) -> Chats:
    """The chats of --instruct_data_file, the tokenizer of --vocab_file and the names of --names_data_file (cfg:
    src/data/dataset.py DataFile; reads only those three)."""
    path = Path(cfg.instruct_data_file)
    check_input_file("--instruct_data_file", path, "a .jsonl file of chats")
    texts = [text.strip() for text in read_texts(path, "--instruct_data_file") if text.strip()]
    if not texts:
        raise UserInputError(f"--instruct_data_file {path} holds no chat; each line is {{\"text\": \"{USER_TAG}: "
                             f"...\\n\\n{BOT_TAG}: ...\"}}")
    if not any(speaker_spans(text, BOT_TAG) for text in texts):
        raise UserInputError(f"--instruct_data_file {path}: no chat has a paragraph that starts with '{BOT_TAG}:', "
                             f"the bot's lines (the only ones trained); tag the user's paragraphs '{USER_TAG}:' and "
                             f"the bot's '{BOT_TAG}:', separated by blank lines")
    pairs, system_lines = load_names(cfg.names_data_file) if cfg.names_data_file else (None, DEFAULT_SYSTEM_LINES)
    return Chats(texts, tokenizer_for_file(cfg.vocab_file), pairs, system_lines)


def load_names(path: str) -> tuple:
    """(NamePairs, system line templates) of a --names_data_file."""
    book = _read_json(path)
    if not isinstance(book, dict) or not {"doc_names", "doc_weights"} <= book.keys():
        raise UserInputError(f"--names_data_file {path} needs the keys doc_names and doc_weights, e.g. "
                             f"{_NAMES_EXAMPLE}")
    documents, document_weights = book["doc_names"], book["doc_weights"]
    if not (isinstance(documents, list) and isinstance(document_weights, list)
            and len(documents) == len(document_weights) and all(map(_is_weight, document_weights))):
        raise UserInputError(f"--names_data_file {path}: doc_names must be a list of {{name: weight}} objects and "
                             f"doc_weights as many weights >= 0, e.g. {_NAMES_EXAMPLE}")
    names, weights, probabilities = [], [], []
    for number, (document, document_weight) in enumerate(zip(documents, document_weights)):
        usable = _document_names(document, f"--names_data_file {path}: doc_names[{number}]")
        if document_weight > 0 and len(usable) >= 2:  # a document needs two names to give a pair
            names.append(list(usable))
            weights.append(np.array(list(usable.values()), dtype=float))
            probabilities.append(document_weight)
    if not names:
        raise UserInputError(f"--names_data_file {path}: no document of positive doc_weights has two names of "
                             f"positive weight, so no name pair can be drawn")
    system_lines = book.get("system_lines", DEFAULT_SYSTEM_LINES)
    if not isinstance(system_lines, (list, tuple)) or not all(isinstance(line, str) for line in system_lines):
        raise UserInputError(f"--names_data_file {path}: system_lines must be a list of strings such as "
                             f"\"{{user}} is talking with {{bot}}.\" ([] for none)")
    return NamePairs(names, weights, np.array(probabilities) / sum(probabilities)), tuple(system_lines)


def _read_json(path: str):
    check_input_file("--names_data_file", path, "a JSON file of names")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"--names_data_file {path}: file not found")
    except json.JSONDecodeError as e:
        raise UserInputError(f"--names_data_file {path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--names_data_file {path} cannot be read as UTF-8 text ({e})")


def _is_weight(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _document_names(document, where: str) -> dict:
    """{name: weight} of one doc_names entry, the names of positive weight only."""
    if not isinstance(document, dict) or not all(map(_is_weight, document.values())):
        raise UserInputError(f"{where} must be an object {{name: weight >= 0}}, e.g. {{\"Ann\": 3, \"Kim\": 1}}")
    for name in document:
        if not name.strip() or "\n" in name or ":" in name:
            raise UserInputError(f"{where}: the name {name!r} cannot be a speaker tag (it must be non-empty, on one "
                                 f"line, without ':')")
    return {name: weight for name, weight in document.items() if weight > 0}
