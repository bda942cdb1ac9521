"""Sampling: windows as pure functions of (seed, rank, epoch, index), ctx warm-up, char vocabularies."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.common import HostMemorySampler
from conftest import ROOT
from src.accumulation import optimizer_steps_in_epoch
from src.config import parse_args
from src.data.dataset import (
    DataFile,
    EpochSampler,
    TokenData,
    TrainingSamples,
    char_tokens,
    context_length,
    dummy_text,
    load_token_data,
    write_char_vocab,
)
from src.errors import UserInputError


def config(*extra):
    return parse_args(["--data_type", "dummy", "--ctx_len", "8", "--micro_bsz", "2", "--epoch_steps", "6", *extra])


def stream(n=1000):
    return TokenData(np.arange(n, dtype=np.uint16), "test", vocab_size=n)


def test_windows_are_shifted_by_one_and_inside_the_data():
    samples = TrainingSamples(stream(), config(), seed=3, rank=0)
    for index in range(30):
        x, y = samples[index]
        assert x.dtype == torch.int64 and len(x) == len(y) == 8
        assert torch.equal(y[:-1], x[1:]) and y[-1] == x[-1] + 1 and 0 <= x[0] and y[-1] < 1000


def test_same_index_same_window_other_rank_or_seed_other_window():
    cfg = config()
    a = TrainingSamples(stream(), cfg, seed=3, rank=0)
    assert torch.equal(a[5][0], TrainingSamples(stream(), cfg, seed=3, rank=0)[5][0])
    starts = {int(s[5][0][0]) for s in (a, TrainingSamples(stream(), cfg, seed=3, rank=1),
                                        TrainingSamples(stream(), cfg, seed=4, rank=0))}
    assert len(starts) == 3
    # a later epoch draws new windows; epoch_begin shifts the epoch used for seeding
    assert int(a[5 + len(a)][0][0]) != int(a[5][0][0])
    resumed = TrainingSamples(stream(), config("--epoch_begin", "1"), seed=3, rank=0)
    assert torch.equal(resumed[5][0], a[5 + len(a)][0])


def test_every_start_is_reachable_including_the_last_window():
    data = TokenData(np.arange(10, dtype=np.uint16), "test", vocab_size=10)
    samples = TrainingSamples(data, config(), seed=0, rank=0)
    starts = {int(samples[i][0][0]) for i in range(200)}
    assert starts == {0, 1}  # 10 tokens hold windows of 9 at offsets 0 and 1


def test_uint16_rows_include_the_last_row():
    rows = np.arange(3 * 9, dtype=np.uint16).reshape(3, 9)
    samples = TrainingSamples(TokenData(rows, "rows", 27), config(), seed=0, rank=0)
    firsts = {int(samples[i][0][0]) for i in range(60)}
    assert firsts == {0, 9, 18}


def test_context_warmup_grows_per_optimizer_step():
    cfg = config("--ctx_len", "100", "--initial_ctx_len", "20", "--ctx_warmup_steps", "4")
    assert [context_length(s, cfg) for s in range(6)] == [20, 40, 60, 80, 100, 100]
    assert context_length(3, config()) == 8


def test_samples_of_one_optimizer_step_share_a_length():
    cfg = config("--ctx_len", "64", "--initial_ctx_len", "8", "--ctx_warmup_steps", "3",
                 "--accumulate_grad_batches", "2")
    samples = TrainingSamples(stream(), cfg, seed=0, rank=0)
    lengths = [len(samples[i][0]) for i in range(12)]
    # micro_bsz 2 x accumulate 2: samples 0-3 are step 0, 4-7 step 1, 8-11 step 2
    assert lengths == [8] * 4 + [26] * 4 + [45] * 4
    assert optimizer_steps_in_epoch(cfg, 0) == 3 and samples.step_of(len(samples)) == 3


def test_sampler_yields_the_epochs_global_indices():
    sampler = EpochSampler(4)
    assert list(sampler) == [0, 1, 2, 3]
    sampler.set_epoch(2)
    assert list(sampler) == [8, 9, 10, 11]


def test_char_vocabulary_file(tmp_path):
    tokens, chars = char_tokens("abca\n你")
    assert len(chars) == 5 and tokens.tolist() == [1, 2, 3, 1, 0, 4]
    write_char_vocab(chars, str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_bytes().decode("utf-16le"))
    assert vocab == {"0": "\n", "1": "a", "2": "b", "3": "c", "4": "你"}


def test_dummy_text_is_the_originals_sums():
    text = dummy_text()
    assert text.startswith(".0+0=0..1+1=2..2+4=6.")
    assert ".9999+" in text and len(set(text)) == 13


def test_float_token_files_are_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(100, dtype=np.float32))
    cfg = parse_args(["--data_type", "numpy", "--data_file", str(tmp_path / "f.npy"), "--vocab_size", "5"])
    with pytest.raises(UserInputError, match="must be integers"):
        load_token_data(DataFile.from_flags(cfg))


def test_training_starts_no_helper_process(tmp_path):
    """A process forked from the training process (a DataLoader worker was one) keeps the old copy of every page
    the training changes after the fork: 29 GiB in a ZeRO-2 offload run on the H200 machine. A whole train.py run
    on the CPU, its process tree sampled throughout, has no other process in it."""
    run = ["--data_type", "dummy", "--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2",
           "--epoch_steps", "20", "--epoch_count", "1", "--epoch_save", "0", "--wkv_backend", "torch",
           "--enable_progress_bar", "0", "--proj_dir", str(tmp_path)]
    process = subprocess.Popen([sys.executable, "train.py", *run], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    with HostMemorySampler(process.pid, interval=0.05) as host:
        output = process.communicate()[0]
    assert process.returncode == 0, output[-2000:]
    assert len((tmp_path / "train_steps.tsv").read_text().splitlines()) == 21  # a header and 20 steps, all sampled
    assert max(helpers for _, _, helpers in host.timeline) == 0
