"""Never lose work (issue 35), preprocess_data.py: hostile or careless inputs through the real command line
(preprocess_data.main), into a folder that holds an earlier output. Each row: exit 2, one line on stderr naming the
flag or file, no traceback, and every earlier file byte-identical (no partial file left). Real SIGINT and SIGTERM during
the work, and a second Ctrl+C during the first one's cleanup, leave nothing either (no worker process left behind)."""
import errno
import json
import os
import re
import signal
import time

import pytest

import preprocess_data
from helpers import CLEANING, TOKENIZER_20B_PARTS, folder_snapshot, package_file, signalled, signalled_both
from src.data import binidx, preprocess

TOKENIZER_20B = package_file(*TOKENIZER_20B_PARTS)
LINES = [json.dumps({"text": f"line {i}: some words to tokenize"}) for i in range(50)]


class FullDisk:
    """Stands in for binidx's `open`: every file it opens refuses its first write with ENOSPC, as a full disk does."""

    def __init__(self, path, mode):
        self.file = open(path, mode)

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def full_disk(monkeypatch):
    monkeypatch.setattr(binidx, "open", FullDisk, raising=False)


ROWS = {  # name: (extra argv, set-up, texts the one line holds)
    # started 100000 workers one by one, for hours, on a 50-line file
    "--workers 100000": (["--workers", "100000"], None, ["--workers 100000 must be at most 1024"]),
    "--workers -3": (["--workers", "-3"], None, ["--workers and --log-interval must be at least 1"]),
    # "about 0 bytes needed" on a full disk: the size is what the outputs need at least, never 0
    "full disk": (["--overwrite"], full_disk, ["no space left on the device of {tmp} for out_text_document.bin (more "
                                               "than "]),
    "input is a folder": (["--input", "{tmp}/folder.jsonl"], None,
                          ["--input {tmp}/folder.jsonl is a folder; give the JSON lines files in it"]),
    "input is not JSON lines": (["--input", "{tmp}/earlier_text_document.bin"], None, ["expected JSON lines"]),
    "output exists": ([], None, ["out_text_document.bin", "--overwrite"]),
    "output is an input under another name": (
        ["--input", "{tmp}/linked.jsonl", "--overwrite"], lambda monkeypatch: None,
        ["the output {tmp}/out_text_document.bin is --input {tmp}/linked.jsonl, which writing it would destroy"]),
    # a named pipe given as a tokenizer file was read for ever
    "tokenizer file is a named pipe": (["--vocab-file", "{tmp}/pipe.json", "--overwrite"], None,
                                       ["tokenizer file {tmp}/pipe.json is not a regular file (a named pipe"]),
    "special tokens file is a named pipe": (
        ["--tokenizer-type", "RWKVTokenizer", "--vocab-file", "rwkv_vocab_v20230424.txt", "--special_tokens_dict_path",
         "{tmp}/pipe.json", "--overwrite"], None, ["special tokens file {tmp}/pipe.json is not a regular file"]),
    "output is the tokenizer's file": (
        ["--vocab-file", "{tmp}/out_text_document.idx", "--overwrite"], None,
        ["the output {tmp}/out_text_document.idx is --vocab-file {tmp}/out_text_document.idx"]),
}


@pytest.mark.parametrize("name", ROWS)
def test_hostile_input_is_one_line_and_loses_nothing(name, tmp_path, capsys, monkeypatch):
    extra, setup, expected = ROWS[name]
    (tmp_path / "in.jsonl").write_text("\n".join(LINES) + "\n")
    (tmp_path / "folder.jsonl").mkdir()
    os.mkfifo(tmp_path / "pipe.json")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
            "--vocab-file", TOKENIZER_20B, "--tokenizer-type", "HFTokenizer"]
    assert preprocess_data.main(argv) == 0  # the earlier output
    os.link(tmp_path / "out_text_document.bin", tmp_path / "linked.jsonl")  # JSON lines by name only
    for suffix in (".bin", ".idx"):
        earlier = (tmp_path / f"out_text_document{suffix}").read_bytes()
        (tmp_path / f"earlier_text_document{suffix}").write_bytes(earlier)
    if setup:
        setup(monkeypatch)
    before = folder_snapshot(tmp_path)
    capsys.readouterr()
    fill = lambda text: text.format(tmp=tmp_path)  # noqa: E731
    assert preprocess_data.main([*argv, *map(fill, extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert fill(text) in err, (fill(text), err)
    assert not re.search(r"\b0 bytes needed|than 0 bytes", err), err
    assert folder_snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "folder.jsonl", "pipe.json"])


def big_input(folder):
    """About 12 MB of JSON lines: tokenizing them takes seconds, so a signal sent once the work starts lands in it."""
    line = json.dumps({"text": "Some words to tokenize, again and again. " * 30}) + "\n"
    path = folder / "big.jsonl"
    path.write_text(line * 10_000)
    return path


def working_in(folder, after: float = 0.0):
    """Whether the temporary output files exist (the workers start then, and the tokenizing follows), `after` seconds
    after they appeared."""
    def ready(printed):
        if not any(p.name.endswith(".partial") for p in folder.iterdir()):
            return False
        time.sleep(after)
        return True
    return ready


def preprocess_argv(folder, workers):
    return ["--input", big_input(folder), "--output-prefix", folder / "out", "--vocab-file", TOKENIZER_20B,
            "--tokenizer-type", "HFTokenizer", "--overwrite", "--workers", workers]


def test_sigint_and_sigterm_during_the_work_leave_nothing(tmp_path):
    """A real SIGINT and a real SIGTERM, each to its own process group, while the two workers start (Ctrl+C reaches
    them too, and printed their KeyboardInterrupt tracebacks): one line each, exit 130 / 143, the earlier outputs as
    they were, no temporary file, no worker left."""
    folders = {signum: tmp_path / signum.name for signum in (signal.SIGINT, signal.SIGTERM)}
    for folder in folders.values():
        folder.mkdir()
        for suffix in (".bin", ".idx"):
            (folder / f"out_text_document{suffix}").write_bytes(b"an earlier output")
    runs = {signum: (preprocess_argv(folder, 2), working_in(folder, after=0.15)) for signum, folder in folders.items()}
    before = {signum: folder_snapshot(folder) for signum, folder in folders.items()}
    for signum, (returncode, printed, err) in signalled_both("preprocess_data.py", runs).items():
        assert returncode == 128 + signum, (printed, err)
        assert err.endswith("\npreprocess_data.py: interrupted; no output was written\n") and "Traceback" not in err
        assert folder_snapshot(folders[signum]) == before[signum]
        assert not [p for p in folders[signum].iterdir() if p.name.startswith(".")]


def test_a_second_ctrl_c_during_the_cleanup_quits_at_once_and_leaves_nothing(tmp_path):
    """Ctrl+C while two workers tokenize, and again while the temporary files are being removed: the second one quits
    at once (exit 130, its one line), the hard exit removes the temporary files and ends the workers (signalled
    checks that no process of the command is left)."""
    returncode, printed, err = signalled("preprocess_data.py", preprocess_argv(tmp_path, 2), signal.SIGINT,
                                         working_in(tmp_path), slow_cleanup=3, again=lambda out: CLEANING in out)
    assert returncode == 130, (printed, err)
    assert err.endswith("\nSIGINT again: quitting at once; files already written are whole.\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_more_workers_than_blocks_or_cores_are_lowered_with_a_note(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("\n".join(LINES) + "\n")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--vocab-file", TOKENIZER_20B, "--tokenizer-type", "HFTokenizer"]
    assert preprocess_data.main([*argv, "--output-prefix", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert preprocess_data.main([*argv, "--output-prefix", str(tmp_path / "many"), "--workers", "1024"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("Note: --workers 1024 lowered to 1: the input is about 1 block of 1 MiB, which a "
                                   "worker tokenizes one at a time"), captured.err
    assert " s with 1 worker: " in captured.out
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"many_text_document{suffix}").read_bytes() == \
               (tmp_path / f"one_text_document{suffix}").read_bytes()


def test_the_cap_counts_blocks_and_cores(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"{}\n" * 1000)  # 3000 bytes: 3 blocks of 1000
    assert preprocess.capped_workers(2, [str(tmp_path / "in.jsonl")], block_bytes=1000) == (2, "") or \
        preprocess.usable_cores() < 2
    workers, note = preprocess.capped_workers(8, [str(tmp_path / "in.jsonl")], block_bytes=1000)
    assert workers == min(3, preprocess.usable_cores()) and note.startswith("Note: --workers 8 lowered to ")
