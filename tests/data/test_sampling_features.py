"""jsonl documents with --select_name, --my_script_mask, magic-prime sampling: unit level and through train.main."""
import json
import math

import numpy as np
import pytest
import torch

import train
from helpers import TOKENIZER_20B_PARTS, WORLD_VOCAB_PARTS, package_file
from src.data import pile_mode, script_mask
from src.data.binidx import MMapIndexedDataset, MMapIndexedDatasetBuilder
from src.config import parse_args
from src.data.dataset import IGNORE_INDEX, DataFile, TrainingSamples, load_token_data, pad_batch
from src.errors import UserInputError
from src.io.outputs import BUNDLE_NAME
from src.data.jsonl import Documents, speaker_mask, speaker_spans
from src.data.tokenizer import HFTokenizer, RWKVTokenizer

TOKENIZER_20B = package_file(*TOKENIZER_20B_PARTS)
WORLD_VOCAB = package_file(*WORLD_VOCAB_PARTS)
TINY = ["--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "2",
        "--epoch_count", "1", "--wkv_backend", "torch", "--enable_progress_bar", "0", "--random_seed", "1"]
CHAT = "Alice: hi\n\nBob: Alice: no\n\nAlice: hello there\n\nBob: ok Alice:\n\nAlice: bye"


def write_chats(path, count=12):
    lines = [json.dumps({"text": f"Bob: question {i}?\n\nAlice: answer {i} is {'yes ' * (i % 5)}ok\n\nBob: thanks"})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_binidx(prefix, documents):
    builder = MMapIndexedDatasetBuilder(prefix, np.uint16)
    for document in documents:
        builder.add_item(document)
        builder.end_document()
    builder.finalize()
    return MMapIndexedDataset(prefix)


# ---- jsonl: what the speaker says

def test_speaker_spans_are_paragraphs_that_start_with_the_name():
    assert [CHAT[a:b] for a, b in speaker_spans(CHAT, "Alice")] == [" hi\n\n", " hello there\n\n", " bye"]
    assert speaker_spans(CHAT, "Carol") == [] and speaker_spans("a.b: x", "a.b") == [(4, 6)]


@pytest.mark.parametrize("kind", ["20B", "World"])
def test_only_the_speakers_tokens_are_trained(kind):
    tokenizer = HFTokenizer.from_file(TOKENIZER_20B) if kind == "20B" else RWKVTokenizer(WORLD_VOCAB)
    ids, spans = tokenizer.encode_with_offsets(CHAT)
    trained = speaker_mask(CHAT, spans, "Alice")
    said = [i for i, keep in zip(ids, trained) if keep]
    decode = tokenizer.decode if isinstance(tokenizer, RWKVTokenizer) else \
        (lambda t: tokenizer.backend.decode(t).encode("utf-8"))
    assert decode(said) == b" hi\n\n hello there\n\n bye"


def test_jsonl_samples_mask_everything_but_the_speaker(tmp_path):
    cfg = parse_args(["--data_type", "jsonl", "--data_file", str(write_chats(tmp_path / "c.jsonl")), "--vocab_file",
                      TOKENIZER_20B, "--vocab_size", "50277", "--select_name", "Alice", "--ctx_len", "64"])
    data = load_token_data(DataFile.from_flags(cfg))
    samples = TrainingSamples(data, cfg, seed=0, rank=0)
    tokenizer = HFTokenizer.from_file(TOKENIZER_20B)
    for index in range(3):
        x, y = samples[index]
        text = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[index])["text"]
        ids = tokenizer.encode(text)
        assert x.tolist() == ids[:-1] and len(y) == len(x)
        targets = [t for t in y.tolist() if t != IGNORE_INDEX]
        alice = text.split("Alice:")[1].split("Bob:")[0]
        assert tokenizer.backend.decode(targets) == alice


def test_long_documents_are_cut_to_ctx_len_and_batches_padded(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "word " * 100}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    cfg = parse_args(["--data_type", "jsonl", "--data_file", str(path), "--vocab_file", TOKENIZER_20B,
                      "--vocab_size", "50277", "--ctx_len", "16"])
    samples = TrainingSamples(load_token_data(DataFile.from_flags(cfg)), cfg, seed=0, rank=0)
    (x0, y0), (x1, y1) = samples[0], samples[1]
    assert len(x0) == 16 and torch.equal(y0[:-1], x0[1:]) and len(x1) == 1
    x, y = pad_batch([samples[0], samples[1]])
    assert x.shape == y.shape == (2, 16)
    assert x[1, 1:].eq(0).all() and y[1, 1:].eq(IGNORE_INDEX).all() and y[1, 0] == y1[0]


def documents(lengths):
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return Documents(np.arange(starts[-1], dtype=np.int32), np.ones(starts[-1], bool), starts)


def test_document_order_passes_and_ranks():
    docs = documents([5, 2, 9, 3])
    assert [docs.document_of(s, seed=0) for s in range(6)] == [0, 1, 2, 3, 0, 1]
    docs.sort = "short_first"
    assert [docs.document_of(s, seed=0) for s in range(4)] == [1, 3, 0, 2]
    docs.sort = "long_first"
    assert [docs.document_of(s, seed=0) for s in range(4)] == [2, 0, 3, 1]
    docs.sort = "shuffle"
    passes = [[docs.document_of(p * 4 + s, seed=7) for s in range(4)] for p in range(6)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in passes) and len({tuple(o) for o in passes}) > 1
    assert passes[2] == [docs.document_of(8 + s, seed=7) for s in range(4)]  # a pure function of (seed, sample)


def test_ranks_share_out_the_documents(tmp_path):
    # the original's jsonl __len__ divided by --devices instead of the world size; here sample s of the run over
    # all ranks is index * world_size + rank, so two ranks read disjoint documents in each pass
    cfg = parse_args(["--data_type", "jsonl", "--data_file", str(write_chats(tmp_path / "c.jsonl", 8)),
                      "--vocab_file", TOKENIZER_20B, "--vocab_size", "50277", "--ctx_len", "64"])
    data = load_token_data(DataFile.from_flags(cfg))
    firsts = {rank: [tuple(TrainingSamples(data, cfg, 0, rank, world_size=2)[i][0][:4].tolist()) for i in range(4)]
              for rank in (0, 1)}
    assert len(set(firsts[0]) | set(firsts[1])) == 8


@pytest.mark.parametrize("content,extra,message", [
    ('{"text": "ok"}\n{"text": "x"\n', [], "c.jsonl:2: malformed JSON"),
    ('{"text": "x"}\n{"text": ""}\n', [], "has no document of two or more tokens"),
    ('{"text": "Bob: hi\\n\\nBob: bye"}\n', ["--select_name", "Alice"],
     "no document of .* has a paragraph by 'Alice:' in the first 1,025 tokens"),
])
def test_bad_jsonl_data(tmp_path, content, extra, message):
    (tmp_path / "c.jsonl").write_text(content)
    cfg = parse_args(["--data_type", "jsonl", "--data_file", str(tmp_path / "c.jsonl"), "--vocab_file",
                      TOKENIZER_20B, "--vocab_size", "50277", *extra])
    with pytest.raises(UserInputError, match=message):
        load_token_data(DataFile.from_flags(cfg))


def test_train_split_keeps_the_first_fraction(tmp_path):
    cfg = parse_args(["--data_type", "jsonl", "--data_file", str(write_chats(tmp_path / "c.jsonl", 10)),
                      "--vocab_file", WORLD_VOCAB, "--vocab_size", "65536", "--train_split_ratio", "0.3"])
    assert len(load_token_data(DataFile.from_flags(cfg)).documents) == 3


def test_damaged_compressed_jsonl(tmp_path):
    (tmp_path / "c.jsonl.gz").write_bytes(b"not gzip")
    cfg = parse_args(["--data_type", "jsonl", "--data_file", str(tmp_path / "c.jsonl.gz"), "--vocab_file",
                      TOKENIZER_20B, "--vocab_size", "50277"])
    with pytest.raises(UserInputError, match="c.jsonl.gz cannot be read"):
        load_token_data(DataFile.from_flags(cfg))


# ---- --my_script_mask on binidx windows

def test_script_mask_cuts_at_the_document_end_and_masks_the_prefix(tmp_path):
    data = write_binidx(tmp_path / "d", [np.arange(0, 10), np.arange(10, 14), np.arange(14, 40)])
    # window from token 7: targets are tokens 8..15; document 0 ends at 10
    assert script_mask.trained_targets(7, 8, True, 0, data).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert script_mask.trained_targets(7, 8, True, 1, data).tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert script_mask.trained_targets(7, 8, False, 3, data).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    # a window in the last document: nothing to cut
    assert script_mask.trained_targets(20, 8, True, 2, data).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_script_masked_samples(tmp_path):
    sizes = [30, 5, 50, 12, 40]
    write_binidx(tmp_path / "d", np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1]))
    cfg = parse_args(["--data_type", "binidx", "--data_file", str(tmp_path / "d"), "--vocab_size", "200",
                      "--ctx_len", "16", "--my_script_mask", "1_3"])
    samples = TrainingSamples(load_token_data(DataFile.from_flags(cfg)), cfg, seed=0, rank=0)
    ends = np.cumsum(sizes)
    for index in range(40):
        x, y = samples[index]
        start = int(x[0])  # token value = position in the stream
        end = int(ends[np.searchsorted(ends, start, side="right")])
        for t in range(16):
            expect_masked = t < 3 or start + 1 + t >= end
            assert (y[t] == IGNORE_INDEX) == expect_masked, (start, t)
            if not expect_masked:
                assert y[t] == start + 1 + t


# ---- magic-prime sampling

def test_is_prime():
    small = [n for n in range(200) if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))]
    assert [n for n in range(200) if pile_mode.is_prime(n)] == small
    assert all(pile_mode.is_prime(p) for p in (324331313, 162165671, 81082817))
    assert not pile_mode.is_prime(324331313 * 3) and not pile_mode.is_prime(561)  # 561: a Carmichael number


def test_magic_prime_positions_are_the_originals_and_visit_every_slot():
    p = 324331313
    factor = int(p * ((math.sqrt(5) - 1) / 2))  # the original's arithmetic, written out
    for s in (0, 1, 2, 40319, 10 ** 9):
        assert pile_mode.magic_prime_start(s, p, 1024, 0) == ((factor * (s + 1) ** 3) % p) * 1024
    assert sorted(pile_mode.magic_prime_start(s, 101, 1, 0) for s in range(101)) == list(range(101))


def test_magic_prime_samples_through_epochs_and_ranks(tmp_path):
    # 46 tokens, ctx_len 4: 11 slots and p = 11; 11 consecutive samples of the run visit each slot once
    np.save(tmp_path / "t.npy", np.arange(46))
    base = ["--data_type", "numpy", "--data_file", str(tmp_path / "t.npy"), "--vocab_size", "46", "--ctx_len", "4",
            "--my_pile_stage", "3", "--magic_prime", "11", "--micro_bsz", "4"]
    one = parse_args([*base, "--devices", "1"])
    assert (one.epoch_steps, one.my_pile_shift) == (10080, 0)
    data = load_token_data(DataFile.from_flags(one))
    samples = TrainingSamples(data, one, seed=0, rank=0)
    starts = [int(samples[i][0][0]) for i in range(11)]
    assert sorted(starts) == list(range(0, 44, 4))
    # two ranks, half the epoch length each: together they draw the same sequence, interleaved
    two = parse_args([*base, "--devices", "2"])
    ranks = [TrainingSamples(data, two, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert [int(ranks[s % 2][s // 2][0][0]) for s in range(11)] == starts
    # the next epoch continues the sequence (sample number = epoch * 40320 + ...)
    assert int(samples[len(samples)][0][0]) == pile_mode.magic_prime_start(40320, 11, 4, 0)


@pytest.mark.parametrize("prime,tokens,shift,message", [
    (12, 46, 0, "not a prime"), (13, 54, 0, "p % 3 == 2"), (11, 60, 0, "does not match the data"),
    (11, 46, 2, "reads past the end"),
])
def test_magic_prime_checks(prime, tokens, shift, message):
    with pytest.raises(UserInputError, match=message):
        pile_mode.check_magic_prime(prime, tokens, 4, shift, "t.npy")


@pytest.mark.parametrize("argv,message", [
    (["--my_pile_stage", "1"], "pass the number of devices with --devices"),
    (["--my_pile_stage", "1", "--devices", "1", "--micro_bsz", "11"], "do not divide into batches of 11"),
    (["--my_pile_stage", "2", "--devices", "1", "--magic_prime", "11"], "set --lr_final to --lr_init"),
    (["--my_pile_stage", "1", "--devices", "1", "--ctx_len", "100"], "needs --magic_prime for --ctx_len 100"),
    (["--my_pile_stage", "1", "--devices", "1", "--load_model", "x.pth"], "remove --load_model"),
    (["--magic_prime", "11"], "apply to --my_pile_stage sampling only"),
    (["--my_script_mask", "1-4"], "must be '<cut>_<n>'"),
    (["--select_name", "Alice"], "applies to --data_type jsonl only"),
])
def test_flag_combinations_are_checked(argv, message):
    with pytest.raises(UserInputError, match=message):
        parse_args(["--data_type", "numpy", "--data_file", "t.npy", *argv])


def test_jsonl_flags_are_checked():
    with pytest.raises(UserInputError, match="needs --vocab_file"):
        parse_args(["--data_type", "jsonl", "--data_file", "c.jsonl"])
    with pytest.raises(UserInputError, match="cut=1 needs the document boundaries"):
        parse_args(["--data_type", "numpy", "--data_file", "t.npy", "--my_script_mask", "1_4"])
    with pytest.raises(UserInputError, match="masks windows of"):
        parse_args(["--data_type", "jsonl", "--data_file", "c", "--vocab_file", "v.json", "--my_script_mask", "0_4"])


def test_continue_pile_run_picks_the_newest_epoch_file(tmp_path):
    for name in ("rwkv-init.pth", "rwkv-2.pth", "rwkv-10.pth", "rwkv-final.pth", "rwkv-last.pth", "rwkv-3-100.pth"):
        (tmp_path / name).write_bytes(b"")
    cfg = parse_args(["--data_type", "dummy", "--proj_dir", str(tmp_path), "--my_pile_stage", "3", "--devices", "1",
                      "--micro_bsz", "8", "--ctx_len", "1024", "--epoch_count", "20"])
    changes, line = pile_mode.pile_continuation(cfg)
    assert "rwkv-10.pth at mini-epoch 11, LR warm-up 30 steps" in line
    assert changes == {"load_model": str(tmp_path / "rwkv-10.pth"), "epoch_begin": 11, "warmup_steps": 30}
    assert cfg.load_model == "" and cfg.epoch_begin == 0  # the parsed flags stay as given
    assert pile_mode.latest_epoch_checkpoint(tmp_path / "empty") == (None, None)


# ---- through train.main

def run(tmp_path, *argv):
    return train.main([*TINY, "--proj_dir", str(tmp_path / "out"), *argv])


def test_train_on_jsonl_with_select_name(tmp_path):
    chats = str(write_chats(tmp_path / "c.jsonl"))
    assert run(tmp_path, "--data_type", "jsonl", "--data_file", chats, "--vocab_file", TOKENIZER_20B,
               "--vocab_size", "50277", "--select_name", "Alice", "--train_data_sort", "shuffle") == 0
    assert (tmp_path / "out" / "rwkv-final.pth").is_file()


def test_documents_the_speaker_says_nothing_in_are_left_out_with_a_note(tmp_path, capsys):
    """A document without a paragraph of --select_name (or with one only past the shortest sample) trained at loss 0:
    it is left out, and the run says so in one line."""
    path = write_chats(tmp_path / "c.jsonl", 4)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "Bob: nobody answers\n\nBob: still nobody"}) + "\n")
        f.write(json.dumps({"text": "Bob: " + "wait " * 40 + "\n\nAlice: too late"}) + "\n")
    argv = ["--data_type", "jsonl", "--data_file", str(path), "--vocab_file", TOKENIZER_20B, "--vocab_size", "50277",
            "--select_name", "Alice"]
    data = load_token_data(DataFile.from_flags(parse_args([*TINY, *argv])))
    assert len(data.documents) == 4
    capsys.readouterr()
    assert run(tmp_path, *argv) == 0
    assert f"Note: --select_name Alice: 2 of the 6 documents of {path} have no paragraph by 'Alice:' in the first 17 " \
           f"tokens (the shortest sample) and are left out: their samples would train nothing.\n" \
           in capsys.readouterr().out


def test_train_refuses_jsonl_ids_beyond_the_vocabulary(tmp_path, capsys):
    chats = str(write_chats(tmp_path / "c.jsonl"))
    assert run(tmp_path, "--data_type", "jsonl", "--data_file", chats, "--vocab_file", WORLD_VOCAB,
               "--vocab_size", "50277") == 2
    err = capsys.readouterr().err
    assert "contains token id" in err and "--vocab_size" in err and err.count("\n") == 1


def test_train_on_binidx_with_script_mask(tmp_path):
    rng = np.random.default_rng(0)
    write_binidx(tmp_path / "d", [rng.integers(1, 60, n) for n in (40, 7, 90)])
    assert run(tmp_path, "--data_type", "binidx", "--data_file", str(tmp_path / "d"), "--vocab_size", "60",
               "--my_script_mask", "1_4") == 0
    rows = [row.split("\t") for row in (tmp_path / "out" / "train_steps.tsv").read_text().splitlines()[1:]]
    assert rows and all(0 < float(r[2]) < 10 for r in rows)  # a real mean over the unmasked targets (ln 60 = 4.1)
    assert (tmp_path / "out" / "rwkv-final.pth").is_file()


def test_train_magic_prime_stage_1_then_stage_3_continues(tmp_path, capsys):
    """A Pile mini-epoch is 5040 steps here: each stage trains one (--max_steps 1, which saves rwkv-last.pth and a
    resume bundle), and stage 1's weights stand in for its finished mini-epoch 0 for stage 3 to continue from."""
    np.save(tmp_path / "t.npy", np.random.default_rng(0).integers(0, 50, 17 * 16 + 5))  # 17 slots of 16 tokens
    pile = ["--data_type", "numpy", "--data_file", str(tmp_path / "t.npy"), "--vocab_size", "50", "--devices", "1",
            "--magic_prime", "17", "--micro_bsz", "8", "--epoch_count", "3", "--max_steps", "1"]
    out = tmp_path / "out"
    assert run(tmp_path, *pile, "--my_pile_stage", "1") == 0
    (out / "rwkv-last.pth").rename(out / "rwkv-0.pth")
    (out / BUNDLE_NAME).unlink()
    capsys.readouterr()
    assert run(tmp_path, *pile, "--my_pile_stage", "3") == 0
    assert f"continuing from {out / 'rwkv-0.pth'} at mini-epoch 1, LR warm-up 30 steps" in capsys.readouterr().out
    assert (out / "rwkv-last.pth").is_file() and (out / BUNDLE_NAME).is_file()


def test_train_refuses_a_magic_prime_that_does_not_fit(tmp_path, capsys):
    np.save(tmp_path / "t.npy", np.arange(50))
    assert run(tmp_path, "--data_type", "numpy", "--data_file", str(tmp_path / "t.npy"), "--vocab_size", "50",
               "--devices", "1", "--my_pile_stage", "1", "--magic_prime", "5") == 2
    assert "--magic_prime 5 does not match the data" in capsys.readouterr().err

