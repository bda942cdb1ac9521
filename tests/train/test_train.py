"""train.main end to end on CPU: every data type, saving rules, loading, bad input, rwkv pip parity."""
import numpy as np
import torch

import train
from helpers import rwkv_pip_logits
from src.data.binidx import MMapIndexedDatasetBuilder
from src.io.checkpoint import load_weights, save_weights
from src.models.rwkv4.config import ForwardOptions, RWKVConfig
from src.models.rwkv4.model import RWKV

TINY = ["--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "2",
        "--epoch_count", "1", "--wkv_backend", "torch", "--enable_progress_bar", "0", "--random_seed", "1"]


def run(tmp_path, *argv):
    return train.main([*TINY, "--proj_dir", str(tmp_path / "out"), *argv])


def epoch_losses(proj_dir):
    lines = (proj_dir / "train_log.txt").read_text().splitlines()
    return [float(line.split()[1]) for line in lines if line[:1].isdigit()]


def test_dummy_data_loss_falls_and_files_are_written(tmp_path):
    argv = ["--n_layer", "2", "--n_embd", "32", "--ctx_len", "32", "--micro_bsz", "4", "--epoch_steps", "12",
            "--epoch_count", "4", "--epoch_save", "2", "--lr_init", "3e-3", "--lr_final", "1e-3",
            "--data_type", "dummy"]
    assert run(tmp_path, *argv) == 0
    out = tmp_path / "out"
    losses = epoch_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    # epoch_save 2 -> epochs 0 and 2, plus the last epoch (3), plus rwkv-final; nothing half-written
    names = sorted(p.name for p in out.iterdir())
    assert names == ["rwkv-0.pth", "rwkv-2.pth", "rwkv-3.pth", "rwkv-final.pth", "rwkv-init.pth", "train_log.txt",
                     "train_steps.tsv", "vocab.json"]
    steps = (out / "train_steps.tsv").read_text().splitlines()
    assert steps[0].split("\t") == ["step", "epoch", "loss", "lr", "ctx_len", "Gtokens", "kt/s"]
    assert [int(row.split("\t")[0]) for row in steps[1:]] == list(range(1, 49))  # a row per optimizer step
    assert float(steps[-1].split("\t")[5]) == 48 * 4 * 32 / 1e9
    assert torch.equal(load_weights(out / "rwkv-3.pth")["head.weight"],
                       load_weights(out / "rwkv-final.pth")["head.weight"])
    assert (out / "train_log.txt").read_text().startswith("NEW RUN ")


def test_saved_weights_load_in_rwkv_pip_with_the_same_logits(tmp_path):
    assert run(tmp_path, "--data_type", "dummy", "--n_layer", "2", "--dim_ffn", "48") == 0
    path = tmp_path / "out" / "rwkv-final.pth"
    weights = load_weights(path)
    model = RWKV(RWKVConfig(vocab_size=weights["emb.weight"].shape[0], n_layer=2, n_embd=16, dim_ffn=48),
                 ForwardOptions(wkv_backend="torch"))
    model.load_state_dict(weights)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    ours = model(torch.tensor([tokens]))[0][0].detach()
    theirs = rwkv_pip_logits(path, tokens)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-4


def test_utf8_and_utf16_text(tmp_path):
    text = "Hello RWKV, 你好世界! " * 20
    for encoding in ("utf-8", "utf-16le"):
        path = tmp_path / f"text.{encoding}"
        path.write_bytes(text.encode(encoding))
        out = tmp_path / encoding
        assert train.main([*TINY, "--proj_dir", str(out), "--data_type", encoding, "--data_file", str(path)]) == 0
        vocab = (out / "vocab.json").read_bytes().decode("utf-16le")
        assert '"你"' in vocab and len(load_weights(out / "rwkv-final.pth")["emb.weight"]) == len(set(text))


def assert_trained(out, vocab_size):
    """TINY's run wrote a model of the data's vocabulary that moved from its start, and 2 steps of 2 x 16 tokens."""
    final, init = load_weights(out / "rwkv-final.pth"), load_weights(out / "rwkv-init.pth")
    assert final["emb.weight"].shape == (vocab_size, 16) and not torch.equal(final["head.weight"], init["head.weight"])
    rows = [row.split("\t") for row in (out / "train_steps.tsv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2] and all(np.isfinite(float(r[2])) for r in rows)
    assert float(rows[-1][5]) == 2 * 2 * 16 / 1e9  # Gtokens


def test_numpy_tokens(tmp_path):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 50, 500))
    assert run(tmp_path, "--data_type", "numpy", "--data_file", str(tmp_path / "tokens.npy"), "--vocab_size", "50") == 0
    assert_trained(tmp_path / "out", 50)


def test_uint16_rows(tmp_path):
    np.random.default_rng(0).integers(0, 50, 17 * 20).astype(np.uint16).tofile(tmp_path / "rows.bin")
    assert run(tmp_path, "--data_type", "uint16", "--data_file", str(tmp_path / "rows.bin"), "--vocab_size", "50",
               "--my_sample_len", "17") == 0
    assert_trained(tmp_path / "out", 50)  # rows of 17 tokens: 16 inputs and 16 targets each


def write_binidx(prefix, documents, dtype=np.uint16):
    builder = MMapIndexedDatasetBuilder(prefix, dtype)
    for doc in documents:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize()


def test_binidx(tmp_path):
    rng = np.random.default_rng(0)
    write_binidx(tmp_path / "data_text_document", [rng.integers(0, 60, n) for n in (40, 7, 90)])
    assert run(tmp_path, "--data_type", "binidx", "--data_file", str(tmp_path / "data_text_document"),
               "--vocab_size", "60") == 0
    assert_trained(tmp_path / "out", 60)


def test_load_model_continues_from_saved_weights(tmp_path):
    assert run(tmp_path, "--data_type", "dummy", "--epoch_count", "2") == 0
    first = tmp_path / "out" / "rwkv-1.pth"
    out2 = tmp_path / "second"
    assert train.main([*TINY, "--proj_dir", str(out2), "--data_type", "dummy", "--load_model", str(first),
                       "--epoch_begin", "2", "--epoch_count", "3", "--lr_init", "1e-9", "--lr_final", "1e-9"]) == 0
    assert not (out2 / "rwkv-init.pth").exists() and (out2 / "rwkv-2.pth").exists()
    before, after = load_weights(first), load_weights(out2 / "rwkv-2.pth")
    for key in before:  # an almost-zero LR: the run started from the file, not from a fresh init
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-6)


def test_missing_data_file(tmp_path, capsys):
    assert run(tmp_path, "--data_type", "numpy", "--data_file", str(tmp_path / "nope.npy"), "--vocab_size", "5") == 2
    err = capsys.readouterr().err
    assert "nope.npy" in err and "not found" in err


def test_missing_binidx_names_the_file(tmp_path, capsys):
    assert run(tmp_path, "--data_type", "binidx", "--data_file", str(tmp_path / "corpus"), "--vocab_size", "5") == 2
    assert "corpus.idx not found" in capsys.readouterr().err


def test_ctx_len_longer_than_data(tmp_path, capsys):
    np.save(tmp_path / "short.npy", np.arange(10))
    assert run(tmp_path, "--data_type", "numpy", "--data_file", str(tmp_path / "short.npy"), "--vocab_size", "50") == 2
    err = capsys.readouterr().err
    assert "short.npy has 10 tokens" in err and "--ctx_len 16" in err


def test_token_id_outside_vocabulary(tmp_path, capsys):
    write_binidx(tmp_path / "doc", [np.array([1, 2, 3] * 20 + [70])])
    assert run(tmp_path, "--data_type", "binidx", "--data_file", str(tmp_path / "doc"), "--vocab_size", "50") == 2
    err = capsys.readouterr().err
    assert "token id 70" in err and "--vocab_size" in err and "doc.bin" in err
    assert not (tmp_path / "out" / "rwkv-init.pth").exists()  # refused before anything was written


def test_truncated_index(tmp_path, capsys):
    write_binidx(tmp_path / "doc", [np.arange(50)])
    idx = tmp_path / "doc.idx"
    idx.write_bytes(idx.read_bytes()[:-3])
    assert run(tmp_path, "--data_type", "binidx", "--data_file", str(tmp_path / "doc"), "--vocab_size", "60") == 2
    assert "truncated" in capsys.readouterr().err


def test_load_model_with_wrong_shapes_lists_them(tmp_path, capsys):
    model = RWKV(RWKVConfig(vocab_size=13, n_layer=2, n_embd=16))
    weights = model.state_dict()
    weights.pop("blocks.1.ffn.key.weight")
    weights["extra.weight"] = torch.zeros(1)
    save_weights(weights, tmp_path / "other.pth")
    # the dummy data has a vocabulary of 13 characters; the flags ask for 1 layer of width 16
    assert run(tmp_path, "--data_type", "dummy", "--load_model", str(tmp_path / "other.pth")) == 2
    err = capsys.readouterr().err
    assert "unexpected keys (18)" in err and "blocks.1.ln1.weight" in err and "--n_layer" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_load_model_missing_file_suggests_pth(tmp_path, capsys):
    save_weights({"x": torch.zeros(1)}, tmp_path / "base.pth")
    assert run(tmp_path, "--data_type", "dummy", "--load_model", str(tmp_path / "base")) == 2
    assert "did you mean" in capsys.readouterr().err
