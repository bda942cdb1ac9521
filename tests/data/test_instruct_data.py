"""--instruct_data_file / --names_data_file: chat samples mixed into the data, names by weight, bot-only targets."""
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

import train
from helpers import TOKENIZER_20B_PARTS, WORLD_VOCAB_PARTS, package_file, refused_in_one_line
from src.config import parse_args
from src.data.dataset import DataFile, TrainingSamples, load_token_data
from src.data.instruct import DEFAULT_SYSTEM_LINES, fill_system_line, load_names, rename_speakers
from src.data.jsonl import speaker_spans
from src.data.tokenizer import RWKVTokenizer

TOKENIZER_20B = package_file(*TOKENIZER_20B_PARTS)
WORLD_VOCAB = package_file(*WORLD_VOCAB_PARTS)


def write_chats(path, count=6):
    lines = [json.dumps({"text": f"Bob: question {i}?\n\nAlice: answer {i} is {'yes ' * (i % 3)}ok\n\nBob: thanks\n\n"
                                 f"Alice: bye {i}"}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False))
    return str(path)


def mixed(tmp_path, *extra, vocab_file=TOKENIZER_20B):
    """A config that mixes chats into numpy tokens 0..999, and its data."""
    np.save(tmp_path / "t.npy", np.arange(1000))
    cfg = parse_args(["--data_type", "numpy", "--data_file", str(tmp_path / "t.npy"), "--vocab_size", "65536",
                      "--vocab_file", vocab_file, "--instruct_data_file", write_chats(tmp_path / "chats.jsonl"),
                      "--micro_bsz", "2", "--epoch_steps", "50", *extra])
    return cfg, load_token_data(DataFile.from_flags(cfg))


def is_window(x, y):
    """numpy tokens 0..999 in order: a window of them, every target trained."""
    return bool((x[1:] - x[:-1]).eq(1).all() and (y == x + 1).all())


def test_the_share_of_chat_samples_is_the_ratio(tmp_path):
    cfg, data = mixed(tmp_path, "--instruct_data_ratio", "0.3", "--ctx_len", "64")  # the bot speaks after ~45 tokens
    draws = 4000
    ranks = [TrainingSamples(data, cfg, seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    chat = [[not is_window(*samples[i]) for i in range(draws)] for samples in ranks]
    for rank in (0, 1):
        assert abs(np.mean(chat[rank]) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / draws), rank
    assert chat[0] != chat[1]  # each GPU draws its own
    again = TrainingSamples(data, cfg, seed=1, rank=0, world_size=2)
    assert all(torch.equal(ranks[0][i][1], again[i][1]) for i in range(0, draws, 97))  # a pure function


def decode(tokenizer, ids) -> str:
    if isinstance(tokenizer, RWKVTokenizer):
        return tokenizer.decode(ids).decode("utf-8")
    return tokenizer.backend.decode(list(ids))


def trained_text(tokenizer, ids, trained) -> str:
    return decode(tokenizer, [i for i, keep in zip(ids, trained) if keep])


@pytest.mark.parametrize("vocab_file", [TOKENIZER_20B, WORLD_VOCAB], ids=["20B", "World"])
def test_chat_samples_train_exactly_the_bots_lines(tmp_path, vocab_file):
    cfg, data = mixed(tmp_path, "--instruct_data_ratio", "1", "--ctx_len", "100", vocab_file=vocab_file)
    openings = [fill_system_line(line, "Bob", "Alice") for line in DEFAULT_SYSTEM_LINES]
    for index in range(5):
        x, y = TrainingSamples(data, cfg, seed=2, rank=0)[index]
        assert len(x) == len(y) == 100
        ids, trained = data.chats.sample(np.random.default_rng(index), 101)
        text = decode(data.chats.tokenizer, ids)
        assert text.split("\n\n")[0] in openings and text.count("\n\nBob: question") >= 2  # chats joined
        said = "".join(text[a:b] for a, b in speaker_spans(text, "Alice"))
        assert trained_text(data.chats.tokenizer, ids, trained) == said and "thanks" not in said


def test_chat_samples_in_which_the_bot_says_nothing_are_drawn_again(tmp_path, capsys):
    """Chats in which the bot says nothing within the sample would count as a loss of 0: other chats are drawn (from
    the sample's own generator), and a sample for which none is found stops the run in one line."""
    cfg, _ = mixed(tmp_path, "--instruct_data_ratio", "1", "--ctx_len", "40")
    late = [json.dumps({"text": f"Bob: {'hello? ' * 20}{i}\n\nAlice: too late"}) for i in range(20)]
    chats = (tmp_path / "chats.jsonl").read_text()
    (tmp_path / "chats.jsonl").write_text("\n".join(late) + "\n" + chats)
    samples = TrainingSamples(load_token_data(DataFile.from_flags(cfg)), cfg, seed=3, rank=0)
    assert all((samples[i][1] != -100).any() for i in range(60))
    (tmp_path / "chats.jsonl").write_text("\n".join(late) + "\n")
    argv = ["--data_type", "numpy", "--data_file", str(tmp_path / "t.npy"), "--vocab_size", "65536", "--vocab_file",
            TOKENIZER_20B, "--instruct_data_file", str(tmp_path / "chats.jsonl"), "--instruct_data_ratio", "1",
            "--ctx_len", "40", "--n_layer", "1", "--n_embd", "16", "--micro_bsz", "1", "--epoch_steps", "2",
            "--wkv_backend", "torch", "--enable_progress_bar", "0", "--proj_dir", str(tmp_path / "out")]
    refused_in_one_line(argv, capsys, f"--instruct_data_file {tmp_path / 'chats.jsonl'}: the chats drawn for a "
                        "sample of 41 tokens, and those drawn 1000 more times for it, hold no paragraph of the bot")


def test_names_replace_the_tags_pair_by_pair(tmp_path):
    names = write_json(tmp_path / "names.json", {"doc_names": [{"Ann": 1, "Kim": 1, "Lee": 1}], "doc_weights": [1],
                                                 "system_lines": ["{user} asks {bot}."]})
    cfg, data = mixed(tmp_path, "--instruct_data_ratio", "1", "--ctx_len", "300", "--names_data_file", names)
    tokenizer = data.chats.tokenizer
    for index in range(4):
        ids, trained = data.chats.sample(np.random.default_rng(index), 300)
        text = decode(tokenizer, ids)
        assert "Bob:" not in text and "Alice:" not in text
        # each pair opens with its system line and lasts 3 chats of 4 tags each (a new pair after 10 tags)
        stretches = re.split(r"(?:^|(?<=\n\n))(\w+) asks (\w+)\.\n\n", text)[1:]
        pairs = list(zip(stretches[0::3], stretches[1::3], stretches[2::3]))
        assert len(pairs) >= 3
        said = ""
        for number, (user, bot, chats) in enumerate(pairs):
            assert user != bot and {user, bot} <= {"Ann", "Kim", "Lee"}
            assert number == len(pairs) - 1 or chats.count(f"{user}: thanks") == 3
            said += "".join(chats[a:b] for a, b in speaker_spans(chats, bot))
        assert trained_text(tokenizer, ids, trained) == said


def test_name_pairs_follow_the_weights(tmp_path):
    pairs, system_lines = load_names(write_json(tmp_path / "n.json", {
        "doc_names": [{"A": 3, "B": 1}, {"C": 1, "D": 1, "E": 2}, {"Solo": 5, "Nobody": 0}],
        "doc_weights": [1, 3, 10]}))  # the third document has one name of positive weight: no pair
    assert system_lines == DEFAULT_SYSTEM_LINES
    expected = {("A", "B"): 1 / 4 * 3 / 4, ("B", "A"): 1 / 4 * 1 / 4,
                ("C", "D"): 3 / 4 * 1 / 4 * 1 / 3, ("C", "E"): 3 / 4 * 1 / 4 * 2 / 3,
                ("D", "C"): 3 / 4 * 1 / 4 * 1 / 3, ("D", "E"): 3 / 4 * 1 / 4 * 2 / 3,
                ("E", "C"): 3 / 4 * 1 / 2 * 1 / 2, ("E", "D"): 3 / 4 * 1 / 2 * 1 / 2}
    draws = 8000
    counts = Counter(pairs.draw(np.random.default_rng([7, n])) for n in range(draws))
    assert set(counts) == set(expected)
    for pair, p in expected.items():
        assert abs(counts[pair] / draws - p) < 4 * math.sqrt(p * (1 - p) / draws), pair


def test_speaker_tags_are_renamed_once():
    # the fork renamed Bob first, then Alice, so a user drawn as "Alice" became the bot as well
    assert rename_speakers("Bob: hi Alice\n\nAlice: Bob: no\nAlice: x", "Alice", "Kim") == \
        ("Alice: hi Alice\n\nKim: Bob: no\nKim: x", 3)
    assert fill_system_line("{{user} and {bot}}", "A{bot}", "B") == "{A{bot} and B}"


@pytest.mark.parametrize("data_type, state_cp", [("uint16", []), ("jsonl", []),
                                                 ("uint16", ["--state_cp", "1", "--ctx_parts", "4"])])
def test_train_mixes_chats_into_batches_of_two(tmp_path, data_type, state_cp):
    chats = write_chats(tmp_path / "chats.jsonl")
    if data_type == "uint16":  # rows of 9 tokens (samples of 8) beside chat samples of 64 (the bot speaks after ~45)
        np.random.default_rng(0).integers(0, 50277, 9 * 20).astype(np.uint16).tofile(tmp_path / "rows.bin")
        data = ["--data_file", str(tmp_path / "rows.bin"), "--my_sample_len", "9"]
    else:
        data = ["--data_file", write_chats(tmp_path / "docs.jsonl")]
    argv = ["--data_type", data_type, *data, "--vocab_size", "50277", "--vocab_file", TOKENIZER_20B,
            "--instruct_data_file", chats, "--instruct_data_ratio", "0.5", "--n_layer", "1", "--n_embd", "16",
            "--ctx_len", "64", "--micro_bsz", "2", "--epoch_steps", "6", "--epoch_count", "1", "--wkv_backend",
            "torch", "--enable_progress_bar", "0", "--random_seed", "1", "--proj_dir", str(tmp_path / "out"), *state_cp]
    assert train.main(argv) == 0
    rows = (tmp_path / "out" / "train_steps.tsv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all(math.isfinite(float(row.split("\t")[2])) for row in rows)


@pytest.mark.parametrize("chats, names, extra, message", [
    ('{"text": "Alice: hi"}\n{"text": "x"\n', None, [], r"chats.jsonl:2: malformed JSON"),
    ('{"text": "Bob: hi\\n\\nBob: bye"}\n', None, [], "no chat has a paragraph that starts with 'Alice:'"),
    ('\n', None, [], "holds no chat"),
    ('{"text": "Alice: hi"}\n', {"names": []}, [], "needs the keys doc_names and doc_weights"),
    ('{"text": "Alice: hi"}\n', {"doc_names": [{"A": 1}], "doc_weights": [1, 2]}, [], "as many weights"),
    ('{"text": "Alice: hi"}\n', {"doc_names": [{"A": 1, "B": 0}], "doc_weights": [1]}, [], "no name pair"),
    ('{"text": "Alice: hi"}\n', {"doc_names": [{"A:": 1, "B": 1}], "doc_weights": [1]}, [], "'A:' cannot be"),
    ('{"text": "Alice: hi"}\n', {"doc_names": [{"A": 1, "B": 1}], "doc_weights": [1], "system_lines": "x"}, [],
     "system_lines must be a list"),
    ('{"text": "Alice: hi"}\n', "{", [], "names.json:1: malformed JSON"),
    ('{"text": "Alice: hi"}\n', None, ["--vocab_file", WORLD_VOCAB], "has 65536 tokens, more than the model's"),
])
def test_bad_chat_and_names_files(tmp_path, capsys, chats, names, extra, message):
    (tmp_path / "chats.jsonl").write_text(chats)
    np.save(tmp_path / "t.npy", np.arange(100))
    argv = ["--data_type", "numpy", "--data_file", str(tmp_path / "t.npy"), "--vocab_size", "50277", "--vocab_file",
            TOKENIZER_20B, "--instruct_data_file", str(tmp_path / "chats.jsonl"), "--instruct_data_ratio", "0.5",
            "--ctx_len", "8", "--proj_dir", str(tmp_path / "out"), *extra]
    if names is not None:
        (tmp_path / "names.json").write_text(names if isinstance(names, str) else json.dumps(names))
        argv += ["--names_data_file", str(tmp_path / "names.json")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--instruct_data_ratio", "1.5"], r"--instruct_data_ratio 1.5 must be in \[0, 1\]"),
    (["--instruct_data_ratio", "-0.1"], r"--instruct_data_ratio -0.1 must be in \[0, 1\]"),
    (["--instruct_data_ratio", "0.5"], "needs --instruct_data_file"),
    (["--instruct_data_file", "c.jsonl"], "needs --instruct_data_ratio"),
    (["--names_data_file", "n.json"], "add --instruct_data_file or remove --names_data_file"),
    (["--instruct_data_file", "c.jsonl", "--instruct_data_ratio", "0.5"], "needs --vocab_file"),
    (["--instruct_data_file", "c.jsonl", "--instruct_data_ratio", "0.5", "--vocab_file", "v.json", "--data_type",
      "utf-8"], "--data_type utf-8 numbers the characters of its own text"),
    (["--vocab_file", "v.json"], "--vocab_file applies to --data_type jsonl and --instruct_data_file only"),
])
def test_instruct_flags_are_checked(argv, message, capsys):
    assert train.main(["--data_type", "numpy", "--data_file", "t.npy", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
