"""RWKV-7 ("x070") as a model family: a tiny model trains from scratch through train.py; --state_cp's gradients equal
plain backpropagation's; our checkpoint gives the `rwkv` package's logits and state (RWKV_V7_ON=1); a state dict in
the released key layout loads strictly; a LoRA run merges to the model its unmerged adapters compute; BlinkDL's
initialisation and LR / weight-decay groups; the flags RWKV-7 refuses."""
import subprocess
import sys

import pytest
import torch

import merge_lora
import train
from helpers import refused_in_one_line, stopped_by_one_sigint
from src import models
from src.eval.model_loader import load_model
from src.io.checkpoint import load_weights, save_weights
from src.models.rwkv7.config import RWKV7Config
from src.models.rwkv7.family import RWKV7
from src.models.rwkv7.model import generate_init_weights
from src.train.state_cp import engine

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
DUMMY_VOCAB = 13  # characters of the built-in dummy data
RUN = ["--data_type", "dummy", "--my_testing", "x070", "--n_layer", "2", "--n_embd", "32", "--head_size", "8",
       "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "5", "--epoch_count", "2", "--epoch_save", "0",
       "--lr_init", "3e-3", "--lr_final", "1e-3", "--random_seed", "1", "--enable_progress_bar", "0"]


def tiny_model(vocab_size=37, n_layer=3, n_embd=32, head_size=8, perturb=0.1, seed=0, **shape):
    """A small RWKV-7 with BlinkDL's init plus noise, so no parameter sits at a special value (the zero output and
    low-rank matrices, ...)."""
    torch.manual_seed(seed)
    model = RWKV7.build(RWKV7Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, head_size=head_size,
                                    **shape))
    model.load_state_dict(generate_init_weights(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def mini_epoch_losses(out: str) -> list:
    return [float(line.split("loss ")[1].split()[0].rstrip(",")) for line in out.splitlines()
            if line.startswith("mini-epoch") and "loss " in line]


# ---------------------------------------------------------------- training through train.py


@pytest.mark.parametrize("segments", [[], ["--state_cp", "1", "--ctx_parts", "3"]], ids=["plain", "state_cp"])
def test_a_tiny_rwkv7_trains_from_scratch_through_train_py(tmp_path, capsys, segments):
    assert train.main([*RUN, *segments, "--proj_dir", str(tmp_path / "out")]) == 0
    losses = mini_epoch_losses(capsys.readouterr().out)
    assert len(losses) == 2 and losses[1] < losses[0]
    weights = load_weights(tmp_path / "out" / "rwkv-final.pth")
    assert models.family_of_weights(weights) is RWKV7
    assert set(weights) == set(released_layout(2, 32, 8, DUMMY_VOCAB, 128, 32, 32, 32, 32))


def test_a_checkpoint_continues_by_its_keys(tmp_path):
    """--load_model without --my_testing: the file says RWKV-7."""
    assert train.main([*RUN, "--epoch_count", "1", "--proj_dir", str(tmp_path / "first")]) == 0
    final = tmp_path / "first" / "rwkv-final.pth"
    again = [a for a in RUN if a not in ("--my_testing", "x070")]
    assert train.main([*again, "--epoch_count", "1", "--load_model", str(final),
                       "--proj_dir", str(tmp_path / "second")]) == 0
    assert set(load_weights(tmp_path / "second" / "rwkv-final.pth")) == set(load_weights(final))


def test_a_checkpoint_of_blinkdls_trainer_loads_without_block_0s_unread_tensors(tmp_path, capsys):
    """BlinkDL's train_temp builds v0/v1/v2 in block 0 too (never read there): his checkpoints are fine-tuned, merged
    and evaluated as the released layout, and the extra tensors change nothing."""
    released = tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2).state_dict()
    C, Dv = released["blocks.1.att.v1"].shape
    blinkdl = {**released, "blocks.0.att.v0": torch.randn(1, 1, C), "blocks.0.att.v1": torch.randn(C, Dv),
               "blocks.0.att.v2": torch.randn(Dv, C)}
    save_weights(released, tmp_path / "released.pth")
    save_weights(blinkdl, tmp_path / "blinkdl.pth")
    tokens = torch.tensor([TOKENS]) % DUMMY_VOCAB
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "blinkdl.pth")(tokens)[0],
                           load_model(tmp_path / "released.pth")(tokens)[0])
    again = [a for a in RUN if a not in ("--my_testing", "x070")]
    assert train.main([*again, "--epoch_count", "1", "--load_model", str(tmp_path / "blinkdl.pth"),
                       "--proj_dir", str(tmp_path / "tuned")]) == 0
    assert set(load_weights(tmp_path / "tuned" / "rwkv-final.pth")) == set(released)
    assert train.main([*again, "--epoch_count", "1", "--load_model", str(tmp_path / "blinkdl.pth"), "--lora",
                       "--lora_r", "4", "--proj_dir", str(tmp_path / "lora")]) == 0
    merged = tmp_path / "merged.pth"
    assert merge_lora.main([str(tmp_path / "blinkdl.pth"), str(tmp_path / "lora" / "rwkv-final.pth"),
                            str(merged)]) == 0
    assert set(load_weights(merged)) == set(released)


def test_a_fine_tune_of_a_file_resumes_with_the_same_command(tmp_path, monkeypatch):
    """The family and the widths came from --load_model's file (no --my_testing, no width flags): Ctrl+C, then the
    same command plus --resume, ends where a straight run ends (the resumed run was refused: its flags did not match
    its bundle's)."""
    widths = dict(d_decay_lora=64, d_aaa_lora=48, d_mv_lora=40, d_gate_lora=96)  # not the rule's 32 at C = 32
    model = RWKV7.build(RWKV7Config(vocab_size=DUMMY_VOCAB, n_layer=2, n_embd=32, head_size=8, **widths))
    save_weights(generate_init_weights(model), tmp_path / "release.pth")
    command = [*[a for a in RUN if a not in ("--my_testing", "x070")], "--epoch_steps", "40", "--epoch_count", "1",
               "--load_model", str(tmp_path / "release.pth"), "--proj_dir", "out"]
    for folder in ("straight", "stopped"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    assert train.main(command) == 0
    monkeypatch.chdir(tmp_path / "stopped")
    assert stopped_by_one_sigint(command, tmp_path / "stopped" / "out") == 130
    assert train.main([*command, "--resume", "out/rwkv-resume.ckpt"]) == 0
    straight = load_weights(tmp_path / "straight" / "out" / "rwkv-final.pth")
    resumed = load_weights(tmp_path / "stopped" / "out" / "rwkv-final.pth")
    assert straight.keys() == resumed.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


# ---------------------------------------------------------------- --state_cp is exact


def test_state_cp_equals_plain_backpropagation_over_the_window():
    """fp64, uneven segments (17 tokens in 5 + 5 + 5 + 2): every parameter's gradient, through the WKV-7 state,
    the token shifts and block 0's v_first carry, equals plain backpropagation's."""
    model = tiny_model(n_layer=3).double().train()
    idx, targets = torch.randint(0, 37, (2, 17)), torch.randint(0, 37, (2, 17))
    names = [name for name, _ in model.named_parameters()]
    plain = model.loss(idx, targets)
    expected = torch.autograd.grad(plain, list(model.parameters()))
    segmented = engine.sample_loss(model, idx, targets, segment_len=5)
    got = torch.autograd.grad(segmented, list(model.parameters()))
    assert torch.allclose(segmented, plain, rtol=1e-12)
    for name, g, e in zip(names, got, expected):
        assert e.norm() > 0, name
        assert (g - e).norm() <= 1e-6 * e.norm(), name


def test_segments_with_the_state_passed_give_the_same_logits():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        whole, state = model(idx)
        first, mid = model(idx[:, :7])
        second, end = model(idx[:, 7:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end.wkv, state.wkv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end.shift, state.shift)


# ---------------------------------------------------------------- the rwkv package (RWKV_V7_ON=1)

_PIP_SCRIPT = """
import os, sys
os.environ["RWKV_V7_ON"] = "1"  # read when rwkv.model is imported
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"
import torch
from rwkv.model import RWKV

model = RWKV(sys.argv[1], "cpu fp32")  # the package appends .pth
tokens = [int(t) for t in sys.argv[3].split(",")]
cut = int(sys.argv[4])
logits, state = model.forward(tokens, None, full_output=True)
first, mid = model.forward(tokens[:cut], None, full_output=True)
second, end = model.forward(tokens[cut:], [s.clone() for s in mid], full_output=True)
torch.save({"logits": logits, "state": state, "continued": torch.cat([first, second]), "end": end}, sys.argv[2])
"""


def rwkv7_pip_run(path, tokens, cut, tmp_path) -> dict:
    """The `rwkv` package's RWKV_x070 (strategy 'cpu fp32', its torch loop) on `tokens` in GPT mode: logits (T, V) and
    its state list (per layer: att x_prev (C), att_kv (H, N, N), ffn x_prev (C)); also the same tokens in two calls
    cut at `cut`. In a subprocess: RWKV_V7_ON is read when rwkv.model is first imported."""
    out = tmp_path / "pip.pt"
    stem = str(path)[:-len(".pth")]
    done = subprocess.run([sys.executable, "-c", _PIP_SCRIPT, stem, str(out), ",".join(map(str, tokens)), str(cut)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_our_checkpoint_gives_the_rwkv_package_logits_and_state(tmp_path):
    model = tiny_model(n_layer=3)
    save_weights(model.state_dict(), tmp_path / "model.pth")
    theirs = rwkv7_pip_run(tmp_path / "model.pth", TOKENS, 5, tmp_path)
    with torch.no_grad():
        logits, state = model(torch.tensor([TOKENS]))
    ours = logits[0]
    assert (theirs["logits"] - ours).abs().max() <= 1e-5
    assert (theirs["continued"] - ours).abs().max() <= 1e-5
    assert (ours - model.logits(model.embed(torch.tensor([TOKENS])))[0]).abs().max() > 0.1  # the blocks matter
    for i in range(model.n_blocks):
        att_shift, wkv_state, ffn_shift = state.layer(i)
        torch.testing.assert_close(theirs["state"][3 * i], att_shift[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs["state"][3 * i + 1], wkv_state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs["state"][3 * i + 2], ffn_shift[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the released key layout


def released_layout(L, C, N, V, F, Dw, Da, Dv, Dg) -> dict:
    """{key: shape} of an RWKV-x070-*.pth as BlinkDL's RWKV-v7/train_temp/src/model.py (Block, RWKV_Tmix_x070,
    RWKV_CMix_x070, RWKV) builds it, less blocks.0.att.v0/v1/v2, which released files do not hold (his
    RWKV-v7/rwkv_v7_demo.py loads them with strict=False for that reason, and the rwkv package fills them in)."""
    H = C // N
    layout = {"emb.weight": (V, C)}
    for i in range(L):
        p = f"blocks.{i}."
        norms = ["ln1", "ln2"] + (["ln0"] if i == 0 else [])
        layout.update({f"{p}{ln}.{part}": (C,) for ln in norms for part in ("weight", "bias")})
        att = {f"x_{c}": (1, 1, C) for c in "rwkvag"}
        att.update({"w0": (1, 1, C), "w1": (C, Dw), "w2": (Dw, C), "a0": (1, 1, C), "a1": (C, Da), "a2": (Da, C)})
        if i > 0:
            att.update({"v0": (1, 1, C), "v1": (C, Dv), "v2": (Dv, C)})
        att.update({"g1": (C, Dg), "g2": (Dg, C), "k_k": (1, 1, C), "k_a": (1, 1, C), "r_k": (H, N)})
        att.update({f"{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")})
        att.update({"ln_x.weight": (C,), "ln_x.bias": (C,)})
        layout.update({f"{p}att.{k}": shape for k, shape in att.items()})
        layout.update({f"{p}ffn.x_k": (1, 1, C), f"{p}ffn.key.weight": (F, C), f"{p}ffn.value.weight": (C, F)})
    layout.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return layout


def test_a_state_dict_in_the_released_layout_loads_strictly():
    """Widths as an older release has them (w 64, a 64, v 32, g 128 where today's rule gives 32, 32, 32, 64 at
    C = 128), channel-mix 3.5 C, head size 64: read from the file, and loaded strictly."""
    layout = released_layout(L=3, C=128, N=64, V=50, F=448, Dw=64, Da=64, Dv=32, Dg=128)
    weights = {key: torch.randn(shape) for key, shape in layout.items()}
    assert models.family_of_weights(weights) is RWKV7
    shape = RWKV7.shape_of_weights(weights)
    assert (shape.n_layer, shape.n_embd, shape.head_size, shape.n_head, shape.dim_ffn) == (3, 128, 64, 2, 448)
    assert (shape.d_decay_lora, shape.d_aaa_lora, shape.d_mv_lora, shape.d_gate_lora) == (64, 64, 32, 128)
    model = RWKV7.from_weights(shape, weights, "cpu")  # strict: keys and shapes exactly
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in layout)
    default = RWKV7Config(vocab_size=50, n_layer=3, n_embd=128)
    assert (default.d_decay_lora, default.d_aaa_lora, default.d_mv_lora, default.d_gate_lora) == (32, 32, 32, 64)


def test_our_model_has_the_released_layout_and_blinkdl_widths():
    model = tiny_model(vocab_size=50, n_layer=2, n_embd=768, head_size=64, perturb=0)
    widths = (64, 64, 32, 128)  # BlinkDL's rule at C = 768 (the released 0.1B's widths)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == released_layout(2, 768, 64, 50, 3072,
                                                                                         *widths)


# ---------------------------------------------------------------- LoRA


def test_a_lora_run_merges_to_what_its_unmerged_adapters_compute(tmp_path, capsys):
    base = tmp_path / "base.pth"
    save_weights(tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2).state_dict(), base)
    lora_run = [a for a in RUN if a not in ("--my_testing", "x070")]
    assert train.main([*lora_run, "--epoch_count", "1", "--lora", "--load_model", str(base), "--lora_r", "4",
                       "--lora_parts", "att,ffn,time,ln", "--lr_init", "1e-2",
                       "--proj_dir", str(tmp_path / "out")]) == 0
    lora = tmp_path / "out" / "rwkv-final.pth"
    trained = load_weights(lora)
    assert "blocks.1.att.output.lora_B" in trained and "blocks.0.ffn.value.lora_A" in trained
    assert "blocks.1.att.w0" in trained and "blocks.1.att.ln_x.weight" in trained  # time and ln trained whole
    assert "blocks.0.att.key.weight" not in trained and "emb.weight" not in trained
    merged = tmp_path / "merged.pth"
    assert merge_lora.main([str(base), str(lora), str(merged)]) == 0
    tokens = torch.tensor([TOKENS[:10]]) % DUMMY_VOCAB
    with torch.no_grad():
        unmerged = load_model(base, str(lora))(tokens)[0]
        merged_logits = load_model(merged)(tokens)[0]
        base_logits = load_model(base)(tokens)[0]
    assert (merged_logits - unmerged).abs().max() <= 1e-5
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the LoRA changed the model


def test_lora_parts():
    shape = RWKV7Config(vocab_size=10, n_layer=2, n_embd=16, head_size=8)
    assert RWKV7.lora_projections(shape, ("att", "ffn"), [1]) == [
        "blocks.1.att.receptance", "blocks.1.att.key", "blocks.1.att.value", "blocks.1.att.output",
        "blocks.1.ffn.key", "blocks.1.ffn.value"]
    time = [f"blocks.1.att.{n}" for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1",
                                          "a2", "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")]
    assert all(RWKV7.trained_whole_part(n) == "time" for n in time + ["blocks.0.ffn.x_k"])
    assert all(RWKV7.trained_whole_part(n) == "ln" for n in ("blocks.0.ln0.weight", "blocks.1.ln2.bias",
                                                             "blocks.1.att.ln_x.weight"))
    assert RWKV7.trained_whole_part("ln_out.weight") is None
    assert RWKV7.trained_whole_part("blocks.1.att.key.weight") is None


# ---------------------------------------------------------------- BlinkDL's init and groups


def test_initialisation_follows_blinkdl():
    model = RWKV7.build(RWKV7Config(vocab_size=100, n_layer=4, n_embd=64, head_size=16))
    weights = generate_init_weights(model)
    assert weights["emb.weight"].abs().max() <= 1e-4
    for zero in ("blocks.2.att.output.weight", "blocks.2.ffn.value.weight", "blocks.2.att.w1", "blocks.2.att.g1"):
        assert not weights[zero].any(), zero
    for name, gain in (("blocks.1.att.receptance.weight", 1.0), ("blocks.1.att.key.weight", 0.1),
                       ("blocks.1.att.w2", 0.1), ("blocks.1.att.g2", 0.1), ("blocks.1.ffn.key.weight", 1.0)):
        singular = torch.linalg.svdvals(weights[name])
        torch.testing.assert_close(singular, torch.full_like(singular, gain), rtol=1e-4, atol=1e-5, msg=name)
    singular = torch.linalg.svdvals(weights["head.weight"])
    torch.testing.assert_close(singular, torch.full_like(singular, 0.5 * (100 / 64) ** 0.5), rtol=1e-4, atol=1e-5)
    for i in range(4):
        torch.testing.assert_close(weights[f"blocks.{i}.att.ln_x.weight"], torch.full((64,), ((i + 1) / 4) ** 0.7))
    # the constructed values of layer 0 (ratio_0_to_1 = 0): w0[n] = -6 + 6 n/(C-1) + 0.5 + 2.5 zigzag[n]
    n = torch.arange(64, dtype=torch.float64)
    zigzag = ((n % 16) - 7.5) / 7.5
    w0 = -6 + 6 * (n / 63) + 0.5 + 2.5 * zigzag * zigzag.abs()
    torch.testing.assert_close(weights["blocks.0.att.w0"].view(-1), w0.float())
    torch.testing.assert_close(weights["blocks.3.att.r_k"], torch.full((4, 16), -0.04))
    torch.testing.assert_close(weights["blocks.3.att.k_a"], torch.full((1, 1, 64), 1.02))
    x_k = 1 - (n / 64) ** ((1 - 3 / 4) ** 4)
    torch.testing.assert_close(weights["blocks.3.ffn.x_k"].view(-1), x_k.float())


def test_lr_and_weight_decay_groups_are_blinkdls():
    assert RWKV7.lr_multiplier("blocks.3.att.w0") == 2.0
    assert RWKV7.lr_multiplier("blocks.3.att.w1") == RWKV7.lr_multiplier("blocks.3.att.key.weight") == 1.0
    decayed = {n for n, p in tiny_model(n_layer=2).named_parameters() if RWKV7.weight_decayed(n, p.shape)}
    assert decayed == {"emb.weight", "head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(2)
        for m in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}


def test_the_trainer_decays_what_the_family_says():
    """build_param_groups asks the family: --weight_decay reaches BlinkDL's matrices and nothing else (w0, w1, ...,
    the norms and the time-mix tensors stay without it)."""
    from src.config import parse_args
    from src.train.trainer import build_param_groups

    model = tiny_model(n_layer=2)
    cfg = parse_args(["--data_type", "dummy", "--my_testing", "x070", "--n_embd", "32", "--head_size", "8",
                      "--weight_decay", "0.1"])
    decayed = {name for group in build_param_groups(model, cfg) if group["weight_decay"] > 0 for name in group["names"]}
    assert decayed == {n for n, p in model.named_parameters() if RWKV7.weight_decayed(n, p.shape)}
    assert "blocks.0.att.w1" not in decayed and "blocks.1.att.key.weight" in decayed


def test_pieces_of_the_forward():
    assert RWKV7.piece_of("emb.weight") == models.EMBEDDING
    assert RWKV7.piece_of("blocks.0.ln0.weight") == 0 and RWKV7.piece_of("blocks.12.att.r_k") == 12
    assert RWKV7.piece_of("ln_out.weight") == RWKV7.piece_of("head.weight") == models.HEAD


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("flag,value", [("--tiny_att_dim", "8"), ("--pre_ffn", "1"), ("--head_qk", "8"),
                                        ("--dim_att", "16"), ("--my_pos_emb", "4")])
def test_rwkv4_only_flags_are_refused_in_one_line(tmp_path, capsys, flag, value):
    refused_in_one_line([*RUN, flag, value, "--proj_dir", str(tmp_path / "out")], capsys,
                        f"{flag} is an RWKV-4 flag", "RWKV-7", f"remove {flag} {value}")


def test_n_embd_must_split_into_heads(tmp_path, capsys):
    refused_in_one_line([*RUN, "--head_size", "12", "--proj_dir", str(tmp_path / "out")], capsys,
                        "--n_embd 32 must be a multiple of --head_size 12")


def test_the_kernel_is_refused_for_other_head_sizes(tmp_path, capsys):
    refused_in_one_line([*RUN, "--wkv_backend", "cuda", "--proj_dir", str(tmp_path / "out")], capsys,
                        "--wkv_backend cuda: the WKV-7 kernel is built for --head_size 64, not 8",
                        "--wkv_backend auto")


def test_the_kernel_is_refused_on_the_cpu(tmp_path, capsys):
    refused_in_one_line([*RUN, "--n_embd", "64", "--head_size", "64", "--wkv_backend", "cuda", "--accelerator", "cpu",
                         "--proj_dir", str(tmp_path / "out")], capsys,
                        "--wkv_backend cuda runs the WKV kernel on a CUDA GPU")


def test_hf_export_is_refused_with_the_reason(tmp_path, capsys):
    import export_hf

    save_weights(tiny_model(n_layer=1).state_dict(), tmp_path / "model.pth")
    refused_in_one_line([str(tmp_path / "model.pth"), str(tmp_path / "hf")], capsys,
                        "transformers has no RWKV-7 class in-tree", main=export_hf.main, prog="export_hf.py")


def test_the_activation_estimate_counts_what_the_wkv_operator_keeps():
    """Per block and token the CUDA kernel keeps S a (4 C bytes) and a state per 16 tokens (N C / 4 bytes); the torch
    twin's autograd keeps a state per token (4 N C bytes). Other head sizes run the twin, kernel or not."""
    from src.models.rwkv7.anatomy import activation_bytes

    def per_token(cfg, wkv_kernel):
        return activation_bytes(cfg, 1, 1, 2, checkpointed=True, inputs_on_device=False, wkv_kernel=wkv_kernel)

    cfg = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=256, head_size=64)
    assert per_token(cfg, False) - per_token(cfg, True) == 4 * 64 * 256 - (4 * 256 + 64 * 256 // 4)
    other = RWKV7Config(vocab_size=65536, n_layer=2, n_embd=256, head_size=32)
    assert per_token(other, True) == per_token(other, False)


def test_a_release_with_its_own_low_rank_widths_fine_tunes_without_width_flags(tmp_path):
    """Releases made by older versions of BlinkDL's code have other widths than today's rule: with the width flags
    left at 0, --load_model's file gives them (and an explicit flag that disagrees is still refused)."""
    widths = dict(d_decay_lora=64, d_aaa_lora=48, d_mv_lora=40, d_gate_lora=96)  # the rule gives 32 at C = 32
    model = RWKV7.build(RWKV7Config(vocab_size=DUMMY_VOCAB, n_layer=2, n_embd=32, head_size=8, dim_ffn=96, **widths))
    save_weights(generate_init_weights(model), tmp_path / "release.pth")
    plain = [a for a in RUN if a not in ("--my_testing", "x070")]
    for picked in ([], ["--my_testing", "x070"]):  # the family from the file, or named as well
        out = tmp_path / f"tuned{len(picked)}"
        assert train.main([*plain, *picked, "--epoch_count", "1", "--load_model", str(tmp_path / "release.pth"),
                           "--proj_dir", str(out)]) == 0
        tuned = load_weights(out / "rwkv-final.pth")
        assert {k: v.shape for k, v in tuned.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert train.main([*plain, "--epoch_count", "1", "--load_model", str(tmp_path / "release.pth"),
                       "--d_gate_lora", "32", "--proj_dir", str(tmp_path / "refused")]) == 2
