"""--state_cp: segment-by-segment backpropagation gives the gradients of full backpropagation.

Tolerances (relative, max |a - b| / max |b| per tensor): fp64 1e-10, fp32 1e-5. The oracle is one
autograd pass over the whole sample with the plain loss (src/loss.py), or, where dropout draws random
masks, over the segments chained with their graphs kept (the same draws in the same order).
"""
import pytest
import torch

from helpers import tiny_model
from src import loss
from src.train.state_cp import engine
from src.lora.adapters import apply_lora, mark_trainable, trainable_names
from src.lora.settings import LoraSettings
from src.loss import IGNORE_INDEX, language_model_loss

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def gradients(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(got, expected, tolerance):
    (loss, grads), (expected_loss, expected_grads) = got, expected
    assert torch.allclose(loss, expected_loss, rtol=tolerance, atol=0), (loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        scale = g.abs().max().clamp(min=1e-30)
        error = ((grads[name] - g).abs().max() / scale).item()
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def sample(batch, length, vocab=37, masked=()):
    """Random ids and targets; positions in `masked` (t or (b, t)) are IGNORE_INDEX."""
    x = torch.randint(0, vocab, (batch, length))
    y = torch.randint(0, vocab, (batch, length))
    for position in masked:
        y[position] = IGNORE_INDEX
    return x, y


def full_backprop(model, x, y):
    return lambda: language_model_loss(model(x)[0], y)


def segmented(model, x, y, segment_len, keep_bytes=0):
    return lambda: engine.sample_loss(model, x, y, segment_len, keep_bytes)


EVERYTHING = 2 ** 40  # keep_bytes: every segment's block inputs are kept between the passes


def test_segment_bounds_cover_the_sample_with_a_shorter_last_segment():
    assert engine.segment_bounds(14, 4) == [(0, 4), (4, 8), (8, 12), (12, 14)]
    assert engine.segment_bounds(14, 7) == [(0, 7), (7, 14)]
    assert engine.segment_bounds(14, 14) == engine.segment_bounds(14, 100) == [(0, 14)]
    assert engine.segment_bounds(14, None) == [(0, 14)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("segment_len", [14, 7, 2, 4], ids=["1 segment", "2 segments", "7 segments", "uneven last"])
@pytest.mark.parametrize("keep_bytes", [0, EVERYTHING], ids=["recomputed", "kept"])
def test_gradients_equal_full_backpropagation(dtype, segment_len, keep_bytes):
    model = tiny_model().to(dtype)
    x, y = sample(1, 14)
    expected = gradients(model, full_backprop(model, x, y))
    got = gradients(model, segmented(model, x, y, segment_len, keep_bytes))
    assert_same_gradients(got, expected, TOLERANCE[dtype])


def test_some_segments_kept_and_the_others_recomputed():
    """keep_bytes for two of four segments: the last two keep their block inputs, the first two run again."""
    model = tiny_model().double()
    x, y = sample(2, 16)
    per_segment = (2 + 1) * 2 * 4 * 16 * 8  # (n_layer + 1) block inputs of (B, S, C) fp64 values
    expected = gradients(model, full_backprop(model, x, y))
    assert_same_gradients(gradients(model, segmented(model, x, y, 4, 2 * per_segment + 1)), expected, 1e-10)


def test_pre_ffn_block_without_wkv_state():
    model = tiny_model(n_layer=3, pre_ffn=1).double()
    x, y = sample(1, 12)
    expected = gradients(model, full_backprop(model, x, y))
    assert_same_gradients(gradients(model, segmented(model, x, y, 5)), expected, 1e-10)


def test_vocabulary_larger_than_a_head_chunk(monkeypatch):
    """The head runs in chunks of tokens; several chunks per segment give the same gradients."""
    # chunks of 3 tokens for batch 1: the vocabulary of 37 is padded to 64 columns (src/loss.py VOCAB_ALIGNMENT)
    monkeypatch.setattr(loss, "LOGITS_PER_CHUNK", 3 * 64)
    model = tiny_model().double()
    x, y = sample(1, 14)
    expected = gradients(model, full_backprop(model, x, y))
    assert_same_gradients(gradients(model, segmented(model, x, y, 7)), expected, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_micro_batch_of_two_with_masks_and_grad_cp(dtype):
    """Masked targets (a jsonl speaker mask, padding, a whole masked segment) count in neither the mean nor the
    gradient; L2Wrap is normalised over the whole sample; --grad_cp nests inside the segment passes."""
    model = tiny_model(grad_cp=True).to(dtype)
    x, y = sample(2, 15, masked=[(0, slice(0, 5)), (1, slice(9, 15)), (0, 12)])
    expected = gradients(model, full_backprop(model, x, y))
    assert_same_gradients(gradients(model, segmented(model, x, y, 5, EVERYTHING)), expected, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lora_every_part(dtype):
    model = tiny_model(n_layer=3).to(dtype)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, parts=("att", "ffn", "time", "ln"), layers=(0, 2))
    apply_lora(model, settings)
    mark_trainable(model, trainable_names(model, settings))
    with torch.no_grad():  # B starts at 0; make the LoRA branch matter
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    x, y = sample(2, 12, masked=[(1, slice(0, 3))])
    expected = gradients(model, full_backprop(model, x, y))
    got = gradients(model, segmented(model, x, y, 5))
    assert any("lora_A" in n for n in got[1]) and not any(n == "emb.weight" for n in got[1])
    assert_same_gradients(got, expected, TOLERANCE[dtype])


def test_lora_dropout_masks_are_redrawn_the_same_when_a_segment_is_recomputed():
    """With dropout the oracle is the chain of segments with their graphs kept: the same draws in the same order."""
    model = tiny_model().double()
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.5, parts=("att", "ffn"), layers=(0, 1))
    apply_lora(model, settings)
    mark_trainable(model, trainable_names(model, settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    x, y = sample(1, 12)

    def chained_graph():
        state, total = None, 0
        for start in range(0, 12, 4):
            logits, state = model(x[:, start:start + 4], state)
            total = total + language_model_loss(logits, y[:, start:start + 4], torch.tensor(12), 12)
        return total

    torch.manual_seed(3)
    expected = gradients(model, chained_graph)
    torch.manual_seed(3)
    got = gradients(model, segmented(model, x, y, 4))  # every segment recomputed: its blocks draw twice more
    assert_same_gradients(got, expected, TOLERANCE[torch.float64])
    after_segmented = torch.rand(1)
    torch.manual_seed(3)
    chained_graph()
    assert torch.equal(after_segmented, torch.rand(1))  # recomputes leave the global RNG where training left it


def test_parameters_receive_one_gradient_per_backward():
    """The property DeepSpeed ZeRO-2 needs: each parameter's gradient is accumulated once, however many segments."""
    model = tiny_model()
    arrivals = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: arrivals.__setitem__(name, arrivals.get(name, 0) + 1))
    x, y = sample(1, 21)
    engine.sample_loss(model, x, y, 3).backward()
    assert arrivals == {name: 1 for name, _ in model.named_parameters()}


def test_fp32_autocast_recompute_matches_the_forward():
    """Under autocast (Lightning's mixed precision) the recomputed segments run under the same autocast."""
    model = tiny_model()
    x, y = sample(1, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = gradients(model, full_backprop(model, x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gradients(model, segmented(model, x, y, 4))
    loss, grads = got
    assert torch.allclose(loss, expected[0], rtol=2e-2)
    for name, g in expected[1].items():  # bf16 matmuls: both sides round, differently split
        assert torch.allclose(grads[name], g, rtol=5e-2, atol=5e-2 * g.abs().max().item()), name


# ---------------------------------------------------------------- through train.main

STEP = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "16", "--ctx_len", "24", "--micro_bsz", "2",
        "--epoch_steps", "1", "--epoch_count", "1", "--lr_init", "1e-3", "--lr_final", "1e-3", "--random_seed", "3",
        "--wkv_backend", "torch", "--enable_progress_bar", "0"]


def test_one_optimizer_step_gives_the_weights_of_full_backpropagation(tmp_path):
    import train
    from src.io.checkpoint import load_weights

    assert train.main([*STEP, "--proj_dir", str(tmp_path / "full")]) == 0
    assert train.main([*STEP, "--proj_dir", str(tmp_path / "segments"), "--state_cp", "1", "--ctx_parts", "5"]) == 0
    full = load_weights(tmp_path / "full" / "rwkv-final.pth")
    segments = load_weights(tmp_path / "segments" / "rwkv-final.pth")
    init = load_weights(tmp_path / "full" / "rwkv-init.pth")
    assert not torch.equal(full["head.weight"], init["head.weight"])  # the step changed the weights
    for name, weight in full.items():  # Adam's first step is ~lr * sign(grad): a wrong gradient moves it by ~lr
        torch.testing.assert_close(segments[name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("flags, named", [
    (["--head_qk", "8"], "--head_qk"),
    (["--my_pos_emb", "5"], "--my_pos_emb"),
    (["--tiny_att_dim", "8", "--tiny_att_layer", "1"], "--tiny_att_dim"),
    (["--strategy", "deepspeed_stage_3"], "deepspeed_stage_3"),
])
def test_features_that_cannot_follow_a_state_are_refused_in_one_line(tmp_path, capsys, flags, named):
    import train

    assert train.main([*STEP, "--proj_dir", str(tmp_path), "--state_cp", "1", "--ctx_parts", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--state_cp 1" in err and named in err, err
    assert not any(tmp_path.iterdir())


PEAK_RSS = """
import resource, sys
import train
code = train.main(sys.argv[1:])
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "EXIT", code)
"""


def peak_rss_mib(tmp_path, ctx_len):
    import subprocess
    import sys

    import numpy as np

    from conftest import ROOT
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, VOCAB, 3 * 4096, dtype=np.int32))
    argv = ["--data_type", "numpy", "--data_file", str(tokens), "--vocab_size", str(VOCAB), "--n_layer", "1",
            "--n_embd", "8", "--ctx_len", str(ctx_len), "--ctx_parts", str(ctx_len // 256), "--state_cp", "1",
            "--micro_bsz", "1", "--epoch_steps", "1", "--epoch_count", "1", "--wkv_backend", "torch",
            "--enable_progress_bar", "0", "--random_seed", "0", "--proj_dir", str(tmp_path / f"out{ctx_len}")]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    line = [l for l in result.stdout.splitlines() if l.startswith("PEAK_RSS_MIB")]
    assert line and line[0].endswith("EXIT 0"), result.stdout[-2000:] + result.stderr[-2000:]
    return float(line[0].split()[1])


VOCAB = 65536


def test_peak_memory_does_not_grow_with_ctx_len(tmp_path):
    """A vocabulary of 65536: the logits of one 4096-token sample would take 1 GiB in fp32 (and as much again
    for their gradient); segments of 256 tokens take 64 MiB each whatever the sample's length."""
    short, long = peak_rss_mib(tmp_path, 512), peak_rss_mib(tmp_path, 4096)
    full_logits_mib = 4096 * VOCAB * 4 / 2**20
    assert long - short < 0.05 * full_logits_mib, (short, long)


def test_two_processes_with_different_segment_counts_do_not_wait_for_each_other(tmp_path):
    """DDP on two CPU processes: rank 0 draws the even documents (one segment each), rank 1 the odd ones (four
    segments each), in every step. No collective runs inside the segment passes, so neither waits: the run ends."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    chats = tmp_path / "docs.jsonl"
    with open(chats, "w", encoding="utf-8") as f:
        for i in range(8):
            text = "short one." if i % 2 == 0 else " ".join(f"word{j}" for j in range(40))
            f.write(json.dumps({"text": text}) + "\n")
    argv = ["--data_type", "jsonl", "--data_file", str(chats), "--vocab_file", "20B_tokenizer.json",
            "--vocab_size", "50277", "--n_layer", "1", "--n_embd", "8", "--ctx_len", "64", "--ctx_parts", "4",
            "--state_cp", "1", "--micro_bsz", "1", "--epoch_steps", "3", "--epoch_count", "1", "--accelerator", "cpu",
            "--devices", "2", "--strategy", "ddp", "--wkv_backend", "torch", "--enable_progress_bar", "0",
            "--random_seed", "1", "--proj_dir", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = (tmp_path / "out" / "train_steps.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == [1, 2, 3]


def test_memory_does_not_grow_with_the_segments():
    """A sample's backward holds what one segment needs, whatever the number of segments: nothing kept between
    segments may pin a segment's (B, S, C) tensors. The state gradients passed from segment to segment were once
    views of each layer's input gradient and kept about four such tensors per layer alive (4 GiB at 7B with
    segments of 4096, found on the H200); here that was 12.5 activations more than one segment's peak, and is
    2.7 now (a block's backward through its state outputs). On the CPU nothing is kept between the passes
    (keep_bytes 0), so the recomputed segment holds the same in both runs."""
    from helpers import LiveTensorBytes

    n_layer, segment, width = 3, 48, 16
    model = tiny_model(n_layer=n_layer, n_embd=width)
    for name, parameter in model.named_parameters():  # few trained values, so gradient sums stay small
        parameter.requires_grad_(".ln" in name)

    def peak_bytes(segments: int) -> int:
        idx, targets = sample(1, segments * segment)
        with LiveTensorBytes() as live:
            engine.sample_loss(model, idx, targets, segment_len=segment).backward()
        return live.peak

    activation = segment * width * 4  # one (1, S, C) fp32 tensor
    assert peak_bytes(3) - peak_bytes(1) < 2 * n_layer * activation
