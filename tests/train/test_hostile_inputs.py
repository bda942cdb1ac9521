"""Never lose work (issue 35), train.py: hostile or careless inputs through the real command line (train.main), into a
--proj_dir that holds a finished run. Each row: exit 2, one line on stderr naming the file or flag, no traceback, and
every file that was there before byte-identical (most rows pass --overwrite_proj_dir 1: the refusal comes before
anything would be replaced)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

import train
from conftest import TINY_RUN
from helpers import folder_snapshot
from src.data.binidx import MMapIndexedDatasetBuilder
from src.data.dataset import WINDOW_REDRAWS, dummy_text
from src.io.checkpoint import load_weights

OVERWRITE = ["--overwrite_proj_dir", "1"]
HELD_OUT = ["--valid_data_file", "{tmp}/held_out.txt", "--valid_data_type", "utf-8"]
NUMPY = ["--data_type", "numpy", "--vocab_size", "20", "--data_file"]
BINIDX = ["--data_type", "binidx", "--vocab_size", "20", "--data_file"]


def write_binidx(prefix, sizes):
    """A binidx file of documents of `sizes` tokens (ids 0..19)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    builder = MMapIndexedDatasetBuilder(str(prefix), np.uint16)
    builder.add_documents((np.arange(int(sizes.sum())) % 20).astype(np.uint16), sizes)
    builder.finalize()


def hostile_files(tmp, proj_dir):
    """The inputs the rows name, beside (and some inside) the finished run's folder."""
    (tmp / "held_out.txt").write_text(dummy_text()[-2000:], encoding="utf-8")
    (tmp / "notes.txt").write_text("my notes, not token ids\n" * 20)
    np.save(tmp / "rows.npy", np.zeros((40, 20), np.int32))
    np.save(tmp / "floats.npy", np.zeros(800, np.float32))
    np.save(tmp / "tokens.npy", (np.arange(800) % 20).astype(np.int32))
    (tmp / "pickled.npy").write_bytes(pickle.dumps(list(range(800))))
    (tmp / "a_folder").mkdir()
    os.mkfifo(tmp / "pipe")  # a reader would wait on it for ever
    write_binidx(tmp / "docs" / "valid_text_document", [50] * 20)
    write_binidx(tmp / "single_tokens", [1] * 400)
    (tmp / "bob_only.jsonl").write_text(json.dumps({"text": "Bob: hello?\n\nBob: anyone?"}) + "\n")


def lock(record):
    return lambda proj_dir: (proj_dir / "rwkv-run.lock").write_text(record)


ROWS = {  # name: (argv after TINY_RUN --proj_dir, what to do to --proj_dir first, texts the one line holds)
    # valid.tsv: a folder failed after training with IsADirectoryError; someone's text got rows under no header
    "valid.tsv is a folder": (
        [*HELD_OUT, *OVERWRITE], lambda p: (p / "valid.tsv").mkdir(),
        ["valid.tsv is a folder, but this run appends its log to it", "move it away"]),
    "valid.tsv holds other text": (
        [*HELD_OUT, *OVERWRITE], lambda p: (p / "valid.tsv").write_text("my notes\n"),
        ["valid.tsv holds other text than this toolkit's log (it starts with 'my notes'"]),
    "valid.tsv is a pipe": (
        [*HELD_OUT, *OVERWRITE], lambda p: os.mkfifo(p / "valid.tsv"), ["valid.tsv is not a regular file"]),
    "train_steps.tsv holds other text": (
        OVERWRITE, lambda p: (p / "train_steps.tsv").write_bytes(b"\x00\xff binary"),
        ["train_steps.tsv holds other text than this toolkit's log"]),
    "train_log.txt holds other text": (
        OVERWRITE, lambda p: (p / "train_log.txt").write_text("shopping list\n"),
        ["train_log.txt holds other text", "'NEW RUN'"]),
    # rwkv-run.lock: OverflowError for a huge pid; a folder was "delete it"
    "lock with a huge pid": (
        [], lock(json.dumps({"pid": 10 ** 30, "host": "h", "started": "s", "command": "c"})),
        ["rwkv-run.lock cannot be read (its pid 1000000000000000000000000000000 is not a process id)",
         "if no run uses this folder, delete"]),
    "lock cut short": ([], lock('{"pid": 12'), ["cannot be read (it is not a JSON record", "delete"]),
    "lock of binary bytes": ([], lambda p: (p / "rwkv-run.lock").write_bytes(os.urandom(64) + b"\xff"),
                             ["cannot be read (it is not a JSON record"]),
    "lock without a host": ([], lock(json.dumps({"pid": 1, "command": 5})), ["its command is not text"]),
    "lock is a folder": ([], lambda p: (p / "rwkv-run.lock").mkdir(),
                         ["rwkv-run.lock is a folder, not the lock file of a run", "move it out of the folder"]),
    "lock is a pipe": ([], lambda p: os.mkfifo(p / "rwkv-run.lock"),
                       ["rwkv-run.lock is a named pipe, not the lock file of a run"]),
    # numpy data: a 2-D array was accepted, a text file got numpy's allow_pickle hint
    "2-D .npy": ([*NUMPY, "{tmp}/rows.npy", *OVERWRITE], None,
                 ["rows.npy holds a 2-D array of shape (40, 20); --data_type numpy needs a 1-D array"]),
    "float .npy": ([*NUMPY, "{tmp}/floats.npy", *OVERWRITE], None,
                   ["floats.npy holds float32 values; token data must be integers"]),
    "text as numpy": ([*NUMPY, "{tmp}/notes.txt", *OVERWRITE], None,
                      ["notes.txt is not a .npy array (it holds text", "numpy.save", "--data_type utf-8"]),
    "pickle as numpy": ([*NUMPY, "{tmp}/pickled.npy", *OVERWRITE], None, ["pickled.npy is a Python pickle"]),
    "folder as numpy": ([*NUMPY, "{tmp}/a_folder", *OVERWRITE], None,
                        ["--data_file {tmp}/a_folder is a folder; give the file's path: --data_type numpy reads a .npy file"]),
    "pipe as --data_file": (["--data_type", "utf-8", "--data_file", "{tmp}/pipe", *OVERWRITE], None,
                            ["--data_file {tmp}/pipe is not a regular file (a named pipe or a device)"]),
    # folders were "file not found"
    "folder as --instruct_data_file": (
        ["--data_type", "numpy", "--vocab_size", "50277", "--data_file", "{tmp}/tokens.npy", "--instruct_data_file",
         "{tmp}/a_folder", "--instruct_data_ratio", "0.5", "--vocab_file", "20B_tokenizer.json", *OVERWRITE], None,
        ["--instruct_data_file {tmp}/a_folder is a folder; give a .jsonl file of chats"]),
    "folder as --load_model": (
        ["--load_model", "{proj_dir}", "--epoch_begin", "2", "--epoch_count", "3"], None,
        ["--load_model {proj_dir} is a folder; --load_model takes a .pth file of weights, e.g. {proj_dir}/rwkv-"]),
    "binidx folder/ as --valid_data_file": (
        [*BINIDX, "{tmp}/docs/valid_text_document", "--valid_data_file", "{tmp}/docs/", *OVERWRITE], None,
        ["--valid_data_file {tmp}/docs/ is a folder; binidx prefixes in it: {tmp}/docs/valid_text_document"]),
    "binidx .bin as --valid_data_file": (
        [*BINIDX, "{tmp}/docs/valid_text_document", "--valid_data_file", "{tmp}/docs/valid_text_document.bin",
         *OVERWRITE], None, ["give the binidx prefix without .bin: {tmp}/docs/valid_text_document"]),
    "text folder as --valid_data_file": (
        ["--valid_data_file", "{tmp}/a_folder", "--valid_data_type", "utf-8", *OVERWRITE], None,
        ["--valid_data_file {tmp}/a_folder is a folder; give the file's path: --valid_data_type utf-8 reads"]),
    "2-D .npy as --valid_data_file": (
        [*NUMPY, "{tmp}/tokens.npy", "--valid_data_file", "{tmp}/rows.npy", *OVERWRITE], None,
        ["--valid_data_file {tmp}/rows.npy holds a 2-D array", "--valid_data_type numpy needs"]),
    # --valid_tokens was refused in the name of evaluate.py's --max_tokens
    "--valid_tokens below a window": (
        [*HELD_OUT, "--valid_tokens", "5", *OVERWRITE], None,
        ["--valid_tokens 5 holds no window of --ctx_len 16", "give at least 17"]),
    # --my_script_mask that masks every target trained at loss 0.0000
    "mask of every target": (
        [*NUMPY, "{tmp}/tokens.npy", "--my_script_mask", "0_16", *OVERWRITE], None,
        ["--my_script_mask 0_16 masks the first 16 targets of every window, but windows have 16 targets"]),
    "mask of every target in the warm-up": (
        [*NUMPY, "{tmp}/tokens.npy", "--my_script_mask", "0_4", "--initial_ctx_len", "4", "--ctx_warmup_steps", "3",
         *OVERWRITE], None, ["windows have 4 targets (--initial_ctx_len 4)"]),
    "cut mask on one-token documents": (
        [*BINIDX, "{tmp}/single_tokens", "--my_script_mask", "1_0", *OVERWRITE], None,
        ["--my_script_mask 1_0 masks every target of every window of {tmp}/single_tokens.bin", "use cut=0"]),
    "mask of every held-out target": (
        [*BINIDX, "{tmp}/docs/valid_text_document", "--valid_data_file", "{tmp}/single_tokens",
         "--my_script_mask", "1_0", *OVERWRITE], None,
        ["--valid_data_file {tmp}/single_tokens: --my_script_mask 1_0 masks every target of its 24 windows"]),
    "--select_name nobody says a word": (
        ["--data_type", "jsonl", "--data_file", "{tmp}/bob_only.jsonl", "--vocab_file", "20B_tokenizer.json",
         "--vocab_size", "50277", "--select_name", "Alice", *OVERWRITE], None,
        ["--select_name Alice: no document of {tmp}/bob_only.jsonl has a paragraph by 'Alice:' in the first 17 tokens "
         "(the shortest sample), so nothing would be trained"]),
    # an output that is an input: --overwrite_proj_dir 1 replaced the weights the run started from
    "--load_model is an output": (
        ["--load_model", "{proj_dir}/rwkv-final.pth", *OVERWRITE], None,
        ["this run's output {proj_dir}/rwkv-final.pth is --load_model {proj_dir}/rwkv-final.pth, which writing it "
         "would destroy; copy it elsewhere and give that copy, or choose another --proj_dir"]),
    "--data_file is the step log": (
        ["--data_type", "utf-8", "--data_file", "{proj_dir}/train_steps.tsv", *OVERWRITE], None,
        ["this run's output {proj_dir}/train_steps.tsv is --data_file {proj_dir}/train_steps.tsv"]),
}


@pytest.mark.parametrize("name", ROWS)
def test_hostile_input_is_one_line_and_loses_nothing(name, finished_copy, tmp_path, capsys):
    argv, damage, expected = ROWS[name]
    hostile_files(tmp_path, finished_copy)
    if damage:
        damage(finished_copy)
    fill = lambda text: text.format(tmp=tmp_path, proj_dir=finished_copy)  # noqa: E731
    before = {path: path.read_bytes() if path.is_file() else None for path in tmp_path.rglob("*")}
    capsys.readouterr()
    assert train.main([*TINY_RUN, "--proj_dir", str(finished_copy), *map(fill, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "allow_pickle" not in err and "--max_tokens" not in err, err
    for text in expected:
        assert fill(text) in err, (fill(text), err)
    assert {path: path.read_bytes() if path.is_file() else None for path in tmp_path.rglob("*")} == before


def test_a_window_masked_whole_mid_run_stops_in_one_line_and_keeps_what_was_trained(tmp_path, capsys):
    """Documents of one token, and 54 of 40 that the mask trains: the run starts (some windows train: the samples of
    the first mini-epoch find one), and a sample whose window, and every window drawn again for it, is masked whole
    (the first of the second mini-epoch) stops it, naming the mask and the window. What it trained is saved as
    rwkv-last.pth, as a Ctrl+C stop saves it, and the line says so."""
    write_binidx(tmp_path / "rare", [40] * 54 + [1] * 1_000_000)
    (tmp_path / "keep.txt").write_text("earlier work")
    proj_dir = tmp_path / "out"
    before = folder_snapshot(tmp_path)
    capsys.readouterr()
    assert train.main([*TINY_RUN, "--proj_dir", str(proj_dir), *BINIDX, str(tmp_path / "rare"),
                       "--my_script_mask", "1_2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --my_script_mask 1_2 masks every target of the window of tokens ") and \
        err.count("\n") == 1, err
    assert f"rare.bin (its document ends at token " in err and f"{WINDOW_REDRAWS} more windows drawn" in err
    steps = len((proj_dir / "train_steps.tsv").read_text().splitlines()) - 1
    assert err.endswith(f"; {proj_dir / 'rwkv-last.pth'} holds the weights trained so far ({steps} optimizer steps)\n")
    last, init = load_weights(proj_dir / "rwkv-last.pth"), load_weights(proj_dir / "rwkv-init.pth")
    assert steps == 2 and last.keys() == init.keys() and any(not torch.equal(last[k], init[k]) for k in last)
    after = folder_snapshot(tmp_path)
    assert all(after[name] == data for name, data in before.items())
    assert not (proj_dir / "rwkv-run.lock").exists() and not (proj_dir / "rwkv-resume.ckpt").exists()
