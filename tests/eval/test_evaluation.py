"""Held-out evaluation: evaluate.py against the model's own forward (plain and --state_cp), the window rule,
masks, released-format and LoRA files, bad input in one line; the engine's position buckets and shards."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from helpers import TOKENIZER_20B_PARTS, package_file, tiny_model
from src.eval import engine
from src.eval.windows import load_windows
from src.data.binidx import MMapIndexedDatasetBuilder
from src.io.checkpoint import save_weights
from src.config import TrainConfig
from src.data.dataset import DataFile, write_char_vocab
from src.lora.adapters import SETTINGS_KEY, apply_lora, lora_state_dict
from src.lora.settings import LoraSettings
from src.loss import IGNORE_INDEX
from src.data.tokenizer import tokenizer_for_file

VOCAB = 37  # tiny_model's


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB, n_layer=2, n_embd=16, seed=3).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    """The tiny model as a .pth and 1000 random tokens as a .npy."""
    folder = tmp_path_factory.mktemp("eval")
    save_weights(model.state_dict(), folder / "model.pth")
    np.save(folder / "tokens.npy", np.random.default_rng(0).integers(0, VOCAB, 1000, dtype=np.int32))
    return folder


def run(capsys, *argv) -> dict:
    """evaluate.main(argv) succeeds (on the CPU, where the references run, unless argv says otherwise); its last
    stdout line, parsed."""
    capsys.readouterr()
    assert evaluate.main(["--accelerator", "cpu", *argv]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def numpy_args(files, *extra) -> list:
    return ["--load_model", str(files / "model.pth"), "--data_type", "numpy", "--data_file",
            str(files / "tokens.npy"), *extra]


def reference(model, x: torch.Tensor, y: torch.Tensor, edges: list) -> tuple:
    """(mean loss, [mean loss per bucket]) of windows x -> y (N, T) from the model's plain forward (whole logits)."""
    with torch.no_grad():
        logits = model(x)[0]
    losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    losses, kept = losses.view_as(y).double(), (y != IGNORE_INDEX)
    by_bucket = [(losses[:, a:b].sum() / kept[:, a:b].sum()).item() for a, b in zip(edges, edges[1:])]
    return (losses.sum() / kept.sum()).item(), by_bucket


def stream_windows(tokens: np.ndarray, ctx_len: int) -> tuple:
    """The window rule written out: window i = tokens[i*L : i*L+L+1]."""
    count = (len(tokens) - 1) // ctx_len
    rows = torch.tensor(np.stack([tokens[i * ctx_len:i * ctx_len + ctx_len + 1] for i in range(count)]),
                        dtype=torch.int64)
    return rows[:, :-1], rows[:, 1:].clone()


# ---------------------------------------------------------------- the numbers


def test_loss_equals_the_models_own_forward(files, model, capsys):
    result = run(capsys, *numpy_args(files, "--ctx_len", "150", "--micro_bsz", "4"))
    x, y = stream_windows(np.load(files / "tokens.npy"), 150)
    loss, by_bucket = reference(model, x, y, [0, 64, 128, 150])
    assert abs(result["loss"] - loss) <= 1e-5 and result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert [start for start, _, _ in result["loss_by_position"]] == [0, 64, 128]
    assert max(abs(got[2] - want) for got, want in zip(result["loss_by_position"], by_bucket)) <= 1e-5
    assert result["tokens"] == 6 * 150 and result["windows"] == 6


def test_state_cp_segments_equal_the_plain_pass(files, capsys):
    plain = run(capsys, *numpy_args(files, "--ctx_len", "150", "--micro_bsz", "6"))
    for flags in (["--state_cp", "1", "--ctx_parts", "4"],  # segments of 38 tokens, the last one 36
                  ["--state_cp", "1"],  # one segment
                  ["--ctx_parts", "3"],  # the WKV operator in parts, one segment
                  ["--state_cp", "1", "--ctx_parts", "7", "--micro_bsz", "4"]):  # segments of 22, batches of 4 and 2
        segmented = run(capsys, *numpy_args(files, "--ctx_len", "150", "--micro_bsz", "6", *flags))
        assert abs(segmented["loss"] - plain["loss"]) <= 1e-5 and segmented["tokens"] == plain["tokens"], flags
        assert max(abs(a[2] - b[2]) for a, b in zip(segmented["loss_by_position"], plain["loss_by_position"])) <= 1e-5


def test_position_buckets_double_up_to_ctx_len():
    assert engine.position_edges(16) == [0, 16]
    assert engine.position_edges(128) == [0, 64, 128]
    assert engine.position_edges(1000) == [0, 64, 128, 256, 512, 1000]
    assert engine.position_edges(131072)[-3:] == [32768, 65536, 131072]


def test_shares_of_the_windows_add_up_to_the_whole(files, model):
    """What every GPU's share sums to (the all-reduce of train.py --valid_data_file) is the one-process result."""
    cfg = TrainConfig(data_type="numpy", data_file=str(files / "tokens.npy"), vocab_size=VOCAB, ctx_len=100)
    windows = load_windows(DataFile.from_flags(cfg))
    whole = engine.evaluate(model, windows, 100, micro_bsz=2)
    shares = [engine.evaluate(model, windows, 100, micro_bsz=2, rank=r, world_size=3) for r in range(3)]
    assert sum(s.windows for s in shares) == whole.windows == 9 and [s.windows for s in shares] == [3, 3, 3]
    assert [sum(c) for c in zip(*(s.counts for s in shares))] == whole.counts
    assert np.allclose(np.sum([s.loss_sums for s in shares], axis=0), whole.loss_sums, rtol=1e-12, atol=0)


def test_evaluation_leaves_the_model_in_its_mode(files, model):
    cfg = TrainConfig(data_type="numpy", data_file=str(files / "tokens.npy"), vocab_size=VOCAB, ctx_len=100)
    model.train()
    engine.evaluate(model, load_windows(DataFile.from_flags(cfg), max_tokens=201), 100, micro_bsz=1)
    assert model.training
    model.eval()


# ---------------------------------------------------------------- windows of every data type


def test_window_rule_counts_whole_windows_only(files, capsys):
    assert run(capsys, *numpy_args(files, "--ctx_len", "16", "--micro_bsz", "31"))["tokens"] == 999 // 16 * 16  # 62
    capped = run(capsys, *numpy_args(files, "--ctx_len", "16", "--max_tokens", "500", "--micro_bsz", "31"))
    assert capped["tokens"] == 499 // 16 * 16 and capped["windows"] == 31
    exact = run(capsys, *numpy_args(files, "--ctx_len", "16", "--max_tokens", "33"))  # 2 * 16 + 1 tokens: 2 windows
    assert exact["windows"] == 2


def test_binidx_documents_are_one_stream_in_file_order(tmp_path):
    documents = [np.arange(1, 8), np.arange(10, 13), np.arange(20, 31)]  # 7 + 3 + 11 = 21 tokens
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "data"), np.uint16)
    for document in documents:
        builder.add_item(document)
        builder.end_document()
    builder.finalize()
    cfg = TrainConfig(data_type="binidx", data_file=str(tmp_path / "data"), vocab_size=VOCAB, ctx_len=6)
    windows = load_windows(DataFile.from_flags(cfg))
    stream = np.concatenate(documents)
    assert len(windows) == 20 // 6 == 3
    for i in range(3):
        x, y = windows[i]
        assert x.tolist() == stream[i * 6:i * 6 + 6].tolist() and y.tolist() == stream[i * 6 + 1:i * 6 + 7].tolist()


def test_text_is_numbered_by_the_models_characters(tmp_path):
    """A held-out text with fewer characters than the training text keeps the training text's ids."""
    model_chars = list(".0123456789+=")
    (tmp_path / "valid.txt").write_text("1+1=2.3+4=7.", encoding="utf-8")
    cfg = TrainConfig(data_type="utf-8", data_file=str(tmp_path / "valid.txt"), vocab_size=13, ctx_len=5)
    windows = load_windows(DataFile.from_flags(cfg), chars=model_chars)
    x, y = windows[0]
    assert len(windows) == 11 // 5 and x.tolist() == [model_chars.index(c) for c in "1+1=2"]
    assert y.tolist() == [model_chars.index(c) for c in "+1=2."]


def test_uint16_rows_are_documents_cut_into_windows(tmp_path):
    rows = np.arange(30, dtype=np.uint16).reshape(3, 10)
    rows.tofile(tmp_path / "rows.bin")
    cfg = TrainConfig(data_type="uint16", data_file=str(tmp_path / "rows.bin"), vocab_size=VOCAB, my_sample_len=10,
                      ctx_len=4)
    windows = load_windows(DataFile.from_flags(cfg))
    # each row of 10 tokens: 9 targets in windows of 4, 4 and 1; no window crosses a row
    assert windows.bounds.tolist() == [[s, min(s + 5, r + 10)] for r in (0, 10, 20) for s in (r, r + 4, r + 8)]
    assert windows[2][0].tolist() == [8] and windows[2][1].tolist() == [9]


# ---------------------------------------------------------------- masks as in training


def test_script_mask_masks_each_window_as_training_would(tmp_path, files, model, capsys):
    documents = [np.random.default_rng(k).integers(1, VOCAB, n) for k, n in enumerate((40, 9, 70, 30))]
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "data"), np.uint16)
    for document in documents:
        builder.add_item(document)
        builder.end_document()
    builder.finalize()
    result = run(capsys, "--load_model", str(files / "model.pth"), "--data_type", "binidx", "--data_file",
                 str(tmp_path / "data"), "--ctx_len", "32", "--my_script_mask", "1_3", "--micro_bsz", "2")
    # window starts 0, 32, 64, 96; each trains its targets up to its first document's end, minus the first 3
    stream = np.concatenate(documents)
    ends = np.cumsum([len(d) for d in documents])
    x, y = stream_windows(stream, 32)
    for i, start in enumerate(range(0, 4 * 32, 32)):
        document_end = ends[np.searchsorted(ends, start, side="right")]
        y[i, max(document_end - start - 1, 0):] = IGNORE_INDEX
        y[i, :3] = IGNORE_INDEX
    loss, _ = reference(model, x, y, [0, 32])
    assert result["tokens"] == int((y != IGNORE_INDEX).sum()) < 4 * 32 and abs(result["loss"] - loss) <= 1e-5


def test_select_name_counts_only_the_speakers_targets(tmp_path, capsys):
    vocab_file = package_file(*TOKENIZER_20B_PARTS)
    texts = ["Bob: Hi there.\n\nAlice: Hello, Bob! How are you?\n\nBob: Fine.",
             "Alice: A second document, said by Alice alone, long enough to need two windows of twelve tokens."]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    model = tiny_model(vocab_size=50277, n_layer=1, n_embd=16).eval()
    save_weights(model.state_dict(), tmp_path / "model.pth")
    result = run(capsys, "--load_model", str(tmp_path / "model.pth"), "--data_type", "jsonl", "--data_file",
                 str(tmp_path / "chats.jsonl"), "--vocab_file", vocab_file, "--select_name", "Alice", "--ctx_len", "12",
                 "--micro_bsz", "3")
    tokenizer = tokenizer_for_file(vocab_file)
    losses, counted = [], 0
    from src.data.jsonl import speaker_mask
    for text in texts:  # each document from its start, from an empty state, in windows of 12 inputs
        ids, spans = tokenizer.encode_with_offsets(text)
        trained = speaker_mask(text, spans, "Alice")
        for start in range(0, len(ids) - 1, 12):
            window = torch.tensor([ids[start:start + 13]])
            y = window[:, 1:].clone()
            y[0, ~torch.from_numpy(trained[start + 1:start + 13])] = IGNORE_INDEX
            with torch.no_grad():
                logits = model(window[:, :-1])[0]
            losses.append(F.cross_entropy(logits[0], y[0], ignore_index=IGNORE_INDEX, reduction="sum").item())
            counted += int((y != IGNORE_INDEX).sum())
    assert result["tokens"] == counted and 0 < counted < sum(len(tokenizer.encode(t)) - 1 for t in texts)
    assert abs(result["loss"] - sum(losses) / counted) <= 1e-5


# ---------------------------------------------------------------- model files


def test_a_released_format_file_is_read_by_its_shape(tmp_path, capsys):
    """A bf16 file of plain v4neo keys, as RWKV-4 releases are, with widths the defaults would not give: no shape
    flag is needed, and the result is the forward of those bf16 values."""
    model = tiny_model(vocab_size=VOCAB, n_layer=3, n_embd=32, dim_ffn=48, seed=5)
    weights = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(weights, tmp_path / "RWKV-4-Tiny-bf16.pth")
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    tokens = np.random.default_rng(1).integers(0, VOCAB, 300)
    np.save(tmp_path / "tokens.npy", tokens)
    result = run(capsys, "--load_model", str(tmp_path / "RWKV-4-Tiny-bf16.pth"), "--data_type", "numpy",
                 "--data_file", str(tmp_path / "tokens.npy"), "--ctx_len", "70")
    loss, _ = reference(model.eval(), *stream_windows(tokens, 70), [0, 64, 70])
    assert abs(result["loss"] - loss) <= 1e-5


@pytest.fixture(scope="module")
def lora_files(files, model):
    """A LoRA of ours (settings stored) on the tiny model, the same without its settings (the original
    toolkit's), and the LoRA model itself as the reference."""
    lora_model = tiny_model(vocab_size=VOCAB, n_layer=2, n_embd=16, seed=3)
    lora_settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, parts=("att", "ffn", "time", "ln"), layers=(0, 1))
    apply_lora(lora_model, lora_settings)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if name.endswith(("lora_B", "time_decay", "ln1.weight")):
                p.add_(0.3 * torch.randn_like(p))
    slim = lora_state_dict(lora_model, lora_settings)
    save_weights(slim, files / "lora.pth")
    save_weights({k: v for k, v in slim.items() if k != SETTINGS_KEY}, files / "lora-original.pth")
    return lora_model.eval()


def test_a_lora_file_on_its_base_gives_the_lora_models_loss(files, lora_files, model, capsys):
    result = run(capsys, *numpy_args(files, "--ctx_len", "100", "--lora_load", str(files / "lora.pth")))
    x, y = stream_windows(np.load(files / "tokens.npy"), 100)
    loss, _ = reference(lora_files, x, y, [0, 64, 100])
    base_loss, _ = reference(model, x, y, [0, 64, 100])
    assert abs(result["loss"] - loss) <= 1e-5 and abs(loss - base_loss) > 1e-3
    original = run(capsys, *numpy_args(files, "--ctx_len", "100", "--lora_load", str(files / "lora-original.pth"),
                                       "--lora_alpha", "8"))
    assert original["loss"] == result["loss"]


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def bad_files(files):
    """Files for the refusals: a head_qk model, a short array, a text with a character the model lacks."""
    save_weights(tiny_model(vocab_size=VOCAB, head_qk=8).state_dict(), files / "head_qk.pth")
    np.save(files / "short.npy", np.arange(10))
    np.save(files / "floats.npy", np.zeros(100, dtype=np.float32))
    (files / "text.txt").write_text("abcä", encoding="utf-8")
    (files / "char-run").mkdir()
    save_weights(tiny_model(vocab_size=3).state_dict(), files / "char-run" / "model.pth")
    write_char_vocab(list("abc"), files / "char-run")
    return files


@pytest.mark.parametrize("case, words", [
    (["--load_model", "{f}/missing.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy"], ["file not found"]),
    (["--load_model", "{f}/lora.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy"],
     ["is a LoRA checkpoint", "--lora_load"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--lora_load",
      "{f}/lora-original.pth"], ["stores no LoRA settings", "--lora_alpha"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--lora_load",
      "{f}/lora.pth", "--lora_alpha", "16"], ["disagrees with lora_alpha 8"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--lora_load",
      "{f}/model.pth"], ["LoRA training never saves"]),
    (["--load_model", "{f}/tokens.npy", "--data_type", "numpy", "--data_file", "{f}/tokens.npy"],
     ["is not a PyTorch file"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--vocab_size", "50"],
     ["--vocab_size 50 differs", "(37)"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/short.npy", "--ctx_len", "16"],
     ["10 tokens give no window of --ctx_len 16"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--ctx_len", "16",
      "--max_tokens", "16"], ["the first --max_tokens 16"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/floats.npy"], ["must be integers"]),
    (["--load_model", "{f}/head_qk.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--state_cp", "1"],
     ["has head_qk", "leave --state_cp out"]),
    (["--load_model", "{f}/model.pth", "--data_file", "{f}/text.txt"], ["vocab.json not found", "--vocab_file"]),
    (["--load_model", "{f}/char-run/model.pth", "--data_file", "{f}/text.txt", "--ctx_len", "2"],
     ["never seen ('ä')"]),
    (["--load_model", "{f}/model.pth", "--data_type", "jsonl", "--data_file", "{f}/tokens.npy"],
     ["needs --vocab_file"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--select_name", "A"],
     ["--select_name applies to --data_type jsonl only"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--my_script_mask",
      "1_0"], ["cut=1 needs the document boundaries"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--max_tokens", "-1"],
     ["--max_tokens -1 must be in [0, "]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--accelerator",
      "cpu", "--wkv_backend", "cuda"], ["--wkv_backend cuda is the GPU kernel"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--ctx_len", "0"],
     ["--ctx_len 0 must be in [1, 2147483647]"]),
    (["--load_model", "{f}/model.pth", "--data_type", "numpy", "--data_file", "{f}/tokens.npy", "--accelerator",
      "tpu"], ["--accelerator must be cpu, gpu or auto"]),
])
def test_bad_input_is_one_line(bad_files, lora_files, capsys, case, words):
    err = one_line_error(capsys, [arg.replace("{f}", str(bad_files)) for arg in case])
    for text in words:
        assert text in err, (text, err)


def test_the_table_and_the_json_line(files, capsys):
    capsys.readouterr()
    assert evaluate.main(numpy_args(files, "--ctx_len", "200", "--accelerator", "cpu")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("evaluate.py: ") and "4 windows of up to 200 tokens, fp32 on cpu" in lines[0]
    assert lines[1].split() == ["positions", "targets", "loss", "perplexity"]
    assert [line.split()[0] for line in lines[2:6]] == ["[0,", "[64,", "[128,", "all"]
    assert "tokens/s" in lines[6]
    summary = json.loads(lines[-1])
    assert {"loss", "perplexity", "tokens", "loss_by_position"} <= summary.keys() and summary["tokens"] == 800


def test_bf16_weights_under_autocast_are_close_to_fp32(files, capsys):
    full = run(capsys, *numpy_args(files, "--ctx_len", "100", "--micro_bsz", "9"))
    half = run(capsys, *numpy_args(files, "--ctx_len", "100", "--micro_bsz", "9", "--precision", "bf16",
                                   "--state_cp", "1", "--ctx_parts", "2"))
    assert abs(half["loss"] - full["loss"]) <= 0.02 and half["tokens"] == full["tokens"]


def test_the_gpu_benchmarks_windows_on_the_cpu(tmp_path):
    """bench/evaluate_speed.py runs on a GPU only; its window flags and data are checked here."""
    from bench import evaluate_speed

    assert evaluate_speed.window_flags(4096) == {"ctx_len": 4096, "ctx_parts": None, "state_cp": 0}
    assert evaluate_speed.window_flags(131072) == {"ctx_len": 131072, "ctx_parts": 32, "state_cp": 1}
    cfg = TrainConfig(data_type="numpy", data_file=str(evaluate_speed.random_tokens(100, 3, tmp_path)),
                      vocab_size=50277, **evaluate_speed.window_flags(100)).finalize()
    windows = load_windows(DataFile.from_flags(cfg))
    assert len(windows) == 3 and cfg.segment_len is None


@pytest.mark.gpu
def test_bf16_on_the_gpu_with_the_kernel_is_close_to_fp32(files, capsys):
    cpu = run(capsys, *numpy_args(files, "--ctx_len", "150", "--accelerator", "cpu"))
    gpu = run(capsys, *numpy_args(files, "--ctx_len", "150", "--accelerator", "gpu", "--precision", "bf16",
                                  "--state_cp", "1", "--ctx_parts", "3", "--wkv_backend", "cuda"))
    assert abs(gpu["loss"] - cpu["loss"]) <= 0.02 and gpu["tokens"] == cpu["tokens"]
