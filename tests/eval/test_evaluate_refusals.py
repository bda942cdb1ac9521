"""evaluate.py prints no result that cannot be right and stops cleanly: hostile flags, a tokenizer of another
vocabulary, masks that leave no target and a model that computes NaN, each refused through the real command line with
exit 2 and one line, every file byte-identical; a real SIGINT / SIGTERM during the evaluation stops it with one
line."""
import json
import os
import signal

import numpy as np
import pytest

import evaluate
from helpers import (TOKENIZER_20B_PARTS, WORLD_VOCAB_PARTS, folder_snapshot, package_file, refused_in_one_line,
                     signalled_both, tiny_model)
from src.io.checkpoint import save_weights

VOCAB = 37  # tiny_model's


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    save_weights(tiny_model(vocab_size=VOCAB).state_dict(), folder / "model.pth")
    broken = tiny_model(vocab_size=VOCAB).state_dict()
    broken["blocks.1.ffn.value.weight"][3, 7] = float("nan")
    save_weights(broken, folder / "nan.pth")
    np.save(folder / "tokens.npy", np.random.default_rng(0).integers(0, VOCAB, 400))
    os.mkfifo(folder / "pipe")
    (folder / "docs.jsonl").write_text(json.dumps({"text": "Some text, long enough for a few windows of tokens."}))
    return folder


def refused(argv, capsys, *expected):
    return refused_in_one_line(argv, capsys, *expected, main=evaluate.main, prog="evaluate.py")


NUMPY = ["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy"]
CASES = {
    "huge --ctx_len": (NUMPY + ["--ctx_len", "99999999999999999999"], ["--ctx_len 99999999999999999999 must be at "
                                                                       "most 2,147,483,647"]),
    "huge --micro_bsz": (NUMPY + ["--micro_bsz", str(2 ** 63)], ["--micro_bsz", "must be at most"]),
    "huge --ctx_parts": (NUMPY + ["--ctx_parts", str(10 ** 30)], ["--ctx_parts", "must be at most"]),
    "huge --max_tokens": (NUMPY + ["--max_tokens", str(10 ** 30)], ["--max_tokens", "must be at most"]),
    "a mask over every target": (NUMPY + ["--ctx_len", "16", "--my_script_mask", "0_16"],
                                 ["the masks (--my_script_mask 0_16) leave no target in any of its 24 windows"]),
    "NaN in the weights": (["--load_model", "{f}/nan.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy",
                            "--ctx_len", "16"], ["the loss of", "nan.pth", "is nan", "non-finite logits"]),
    "fp16 on the CPU": (NUMPY + ["--precision", "fp16", "--accelerator", "cpu"],
                        ["--precision fp16 needs a CUDA GPU, and this evaluation runs on cpu", "use --precision bf16"]),
    "a named pipe as the model": (["--load_model", "{f}/pipe", "--data_type", "numpy", "--data_file",
                                   "{f}/tokens.npy"], ["--load_model {f}/pipe is not a regular file"]),
}


@pytest.mark.parametrize("argv, words", CASES.values(), ids=CASES.keys())
def test_results_that_cannot_be_right_are_refused(files, capsys, argv, words):
    before = folder_snapshot(files)
    refused([a.replace("{f}", str(files)) for a in argv], capsys, *(w.replace("{f}", str(files)) for w in words))
    assert folder_snapshot(files) == before


@pytest.mark.parametrize("parts, size", [(TOKENIZER_20B_PARTS, "50,277"), (WORLD_VOCAB_PARTS, "65,536")])
def test_a_tokenizer_of_another_vocabulary_is_refused(files, capsys, parts, size):
    vocab_file = package_file(*parts)
    refused(["--load_model", str(files / "model.pth"), "--data_type", "jsonl", "--data_file",
             str(files / "docs.jsonl"), "--vocab_file", vocab_file], capsys,
            f"has a vocabulary of {size} tokens and {files / 'model.pth'} one of 37")


def test_a_character_vocabulary_of_another_run_is_refused(files, capsys, finished_run):
    from src.data.dataset import write_char_vocab

    (files / "other-run").mkdir(exist_ok=True)
    write_char_vocab(list("abcdefgh"), files / "other-run")
    refused(["--load_model", str(finished_run / "rwkv-final.pth"), "--data_type", "dummy", "--vocab_file",
             str(files / "other-run" / "vocab.json"), "--max_tokens", "100", "--ctx_len", "16"], capsys,
            "has 8 characters and", "it is not the vocab.json of the run that trained the model")


def test_a_tokenizer_padded_to_the_model_is_accepted(files, capsys):
    """The 20B tokenizer's 50,277 tokens fit a model of 50,277 and one padded to 50,304 (a multiple of 64)."""
    vocab_file = package_file(*TOKENIZER_20B_PARTS)
    for vocab_size in (50277, 50304):
        save_weights(tiny_model(vocab_size=vocab_size, n_embd=8).state_dict(), files / "pile.pth")
        assert evaluate.main(["--load_model", str(files / "pile.pth"), "--data_type", "jsonl", "--data_file",
                              str(files / "docs.jsonl"), "--vocab_file", vocab_file, "--ctx_len", "4"]) == 0
        summary = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert summary["tokens"] > 0 and np.isfinite(summary["loss"])
    (files / "pile.pth").unlink()


def test_sigint_and_sigterm_during_the_evaluation_stop_with_one_line(finished_run):
    """The whole built-in text through a character-level model takes minutes: both signals land in the evaluation,
    after its heading line."""
    argv = ["--load_model", finished_run / "rwkv-final.pth", "--data_type", "dummy", "--ctx_len", "16",
            "--wkv_backend", "torch"]
    started = {signum: (argv, lambda printed: printed.startswith("evaluate.py: ")) for signum in (signal.SIGINT,
                                                                                                signal.SIGTERM)}
    for signum, (returncode, printed, err) in signalled_both("evaluate.py", started).items():
        assert returncode == 128 + signum, (printed, err)
        assert err == f"evaluate.py: {signum.name}: stopped; no result\n", err
        assert printed.count("\n") == 1 and "windows of up to 16 tokens" in printed  # the heading line only
