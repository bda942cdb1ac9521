"""LoRA training: the layer-spec parser, LoraLinear, which parameters train, flags, and train.main --lora runs."""
import pytest
import torch

import train
from helpers import tiny_model
from src.train import trainer
from src.io.checkpoint import load_weights, save_weights
from src.config import parse_args
from src.errors import UserInputError
from src.lora.adapters import (
    SETTINGS_KEY,
    LoraLinear,
    apply_lora,
    decode_settings,
    lora_state_dict,
    prepare_lora_training,
    trainable_names,
)
from src.lora.merge import delta_weight
from src.layer_spec import format_layers, parse_layer_spec
from src.lora.settings import LoraSettings
from src.train.resuming import shaping_flags

DUMMY_VOCAB = 13  # characters of the built-in dummy data
TINY = ["--n_layer", "2", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "3",
        "--epoch_count", "1", "--data_type", "dummy", "--wkv_backend", "torch", "--enable_progress_bar", "0",
        "--random_seed", "1"]


def settings(parts=("att", "ffn", "time", "ln"), layers=(0, 1), r=4, alpha=8.0, dropout=0.0):
    return LoraSettings(r=r, alpha=alpha, dropout=dropout, parts=tuple(parts), layers=tuple(layers))


# ---------------------------------------------------------------- layer specs


def test_layer_spec_ranges_and_coefficients():
    assert list(parse_layer_spec("0-3 25-31")) == [0, 1, 2, 3, *range(25, 32)]
    assert parse_layer_spec("0.5*0-1 1*2,3", coefficients=True) == {0: 0.5, 1: 0.5, 2: 1.0, 3: 1.0}
    assert format_layers(parse_layer_spec("5 0-2 7 8")) == "0-2 5 7-8"


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("a-b", "cannot read 'a-b'"),
    ("3-1", "runs backwards"),
    ("0-2 2", "layer 2 twice"),
    ("0-4", "lists layer 4, but the model has 4 layers (0-3)"),
    ("0.5*0-1", "takes layers only"),
])
def test_layer_spec_errors(spec, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_layer_spec(spec, n_layer=4)


def test_layer_filter_coefficient_must_be_a_number():
    with pytest.raises(UserInputError, match="'x' in 'x\\*0' is not a number"):
        parse_layer_spec("x*0", coefficients=True)


# ---------------------------------------------------------------- the module


def test_lora_linear_keeps_weight_key_and_adds_original_names():
    base = torch.nn.Linear(6, 5, bias=False)
    module = LoraLinear(base, r=3, scale=2.0)
    assert module.weight is base.weight
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        "weight": (5, 6), "lora_A": (3, 6), "lora_B": (5, 3)}
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(module(x), base(x), rtol=0, atol=0)  # B = 0: the start changes nothing


def test_lora_linear_output_is_base_plus_delta_and_dropout_hits_only_the_branch():
    base = torch.nn.Linear(6, 5, bias=False)
    module = LoraLinear(base, r=3, scale=2.0, dropout=0.5)
    with torch.no_grad():
        module.lora_B.normal_()
    x = torch.randn(2, 4, 6)
    merged = x @ (base.weight + delta_weight(module.lora_A, module.lora_B, 2.0)).T
    torch.testing.assert_close(module.eval()(x), merged, rtol=1e-5, atol=1e-5)
    # training mode: dropout on the branch input only, so the difference to the base output stays low rank
    module.train()
    branch = module(x) - base(x)
    assert not torch.allclose(branch, merged - base(x), atol=1e-3)
    with torch.no_grad():
        module.lora_B.zero_()
    torch.testing.assert_close(module(x), base(x), rtol=0, atol=0)  # the base path never sees dropout


# ---------------------------------------------------------------- which parameters train


def test_selection_by_parts_and_layers():
    model = tiny_model(n_layer=3)
    s = settings(parts=("att", "time", "ln"), layers=(0, 2))
    assert apply_lora(model, s) == ["blocks.0.att.key", "blocks.0.att.value", "blocks.0.att.receptance",
                                    "blocks.2.att.key", "blocks.2.att.value", "blocks.2.att.receptance"]
    names = trainable_names(model, s)
    assert [n for n in names if n.startswith("blocks.0.")] == [
        "blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.0.ln2.weight", "blocks.0.ln2.bias",
        "blocks.0.ln0.weight", "blocks.0.ln0.bias",
        "blocks.0.att.time_decay", "blocks.0.att.time_first", "blocks.0.att.time_mix_k", "blocks.0.att.time_mix_v",
        "blocks.0.att.time_mix_r", "blocks.0.att.key.lora_A", "blocks.0.att.key.lora_B", "blocks.0.att.value.lora_A",
        "blocks.0.att.value.lora_B", "blocks.0.att.receptance.lora_A", "blocks.0.att.receptance.lora_B",
        "blocks.0.ffn.time_mix_k", "blocks.0.ffn.time_mix_r"]
    assert not any(n.startswith("blocks.1.") for n in names)  # the original's "block." bug trained these
    assert all(n.startswith("blocks.") for n in names)  # never emb, head, ln_out
    assert not any(n.endswith(("key.weight", "value.weight", "receptance.weight", "output.weight")) for n in names)


def test_ffn_part_and_parts_without_lora_modules():
    model = tiny_model(n_layer=2)
    assert apply_lora(model, settings(parts=("ffn",), layers=(1,))) == [
        "blocks.1.ffn.key", "blocks.1.ffn.receptance", "blocks.1.ffn.value"]
    plain = tiny_model(n_layer=2)
    s = settings(parts=("time",), layers=(0, 1))
    assert apply_lora(plain, s) == []
    assert all(n.split(".")[-1].startswith("time_") for n in trainable_names(plain, s))
    assert len(trainable_names(plain, s)) == 2 * 7


def test_pre_ffn_block_has_no_att_but_its_ffnpre_time_mix_trains():
    model = tiny_model(n_layer=2, pre_ffn=1)
    s = settings(parts=("att", "time"), layers=(0,))
    assert apply_lora(model, s) == []
    assert trainable_names(model, s) == ["blocks.0.ffnPre.time_mix_k", "blocks.0.ffnPre.time_mix_r",
                                         "blocks.0.ffn.time_mix_k", "blocks.0.ffn.time_mix_r"]


def test_slim_state_dict_holds_trained_keys_and_settings():
    model = tiny_model(n_layer=2)
    s = settings(parts=("att", "ln"), layers=(1,))
    apply_lora(model, s)
    slim = lora_state_dict(model, s)
    assert list(slim) == [*trainable_names(model, s), SETTINGS_KEY]
    stored, identity = decode_settings(slim[SETTINGS_KEY], "x")
    assert stored == s
    assert identity == {"vocab_size": 37, "n_layer": 2, "n_embd": 16, "dim_att": 16, "dim_ffn": 64,
                        "pre_ffn": False, "head_qk": 0}


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "0"], "--lora_r must be at least 1"),
    (["--lora_alpha", "0"], "--lora_alpha must be a positive number"),
    (["--lora_dropout", "1"], r"--lora_dropout must lie in \[0, 1\)"),
    (["--lora_parts", "att,emb"], "--lora_parts 'att,emb': use a comma list of att, ffn, time, ln"),
    (["--lora_layers", "0-2"], r"--lora_layers lists layer 2, but the model has 2 layers \(0-1\)"),
    (["--lora_layers", "1..2"], "--lora_layers: cannot read '1..2'"),
])
def test_bad_lora_flags(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_args([*TINY, "--lora", "--load_model", "base.pth", *flags])


def test_lora_flags_are_ignored_without_lora():
    cfg = parse_args([*TINY, "--lora_r", "0"])
    assert cfg.lora_r == 0 and cfg.lora_settings is None


def test_lora_load_without_lora_is_refused():
    with pytest.raises(UserInputError, match="--lora_load adapter.pth continues LoRA adapters, which only a --lora "
                                             "run trains; add --lora"):
        parse_args(["--data_type", "dummy", "--lora_load", "adapter.pth"])


def test_lora_settings_are_derived_once_from_the_flags():
    cfg = parse_args([*TINY, "--lora", "--load_model", "base.pth", "--lora_r", "4", "--lora_parts", "ffn, att",
                      "--lora_layers", "1"])
    assert cfg.lora_settings == LoraSettings(r=4, alpha=32.0, dropout=0.01, parts=("att", "ffn"), layers=(1,))
    # a resume bundle compares the flags, not the settings derived from them
    flags = shaping_flags(cfg)
    assert "lora_settings" not in flags and (flags["lora_parts"], flags["lora_layers"]) == ("ffn, att", "1")


# ---------------------------------------------------------------- train.main --lora


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.pth"
    save_weights(tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2).state_dict(), path)
    return path


@pytest.fixture
def trained_modules(monkeypatch):
    """The Lightning modules train.main builds, to look at the model after the run."""
    modules = []

    class Recorded(trainer.RWKVModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modules.append(self)

    monkeypatch.setattr(trainer, "RWKVModule", Recorded)
    return modules


def run_lora(tmp_path, base_file, *flags, out="out"):
    return train.main([*TINY, "--proj_dir", str(tmp_path / out), "--lora", "--load_model", str(base_file),
                       "--lora_r", "4", *flags])


@pytest.mark.parametrize("grad_cp", ["0", "1"])
def test_lora_run_changes_only_lora_time_ln_and_saves_only_them(tmp_path, base_file, trained_modules, grad_cp):
    assert run_lora(tmp_path, base_file, "--lora_parts", "att,ffn,time,ln", "--grad_cp", grad_cp) == 0
    model = trained_modules[0].model
    base = load_weights(base_file)
    s = settings(r=4, alpha=32.0, dropout=0.01)
    names = trainable_names(model, s)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert sum(n.endswith("lora_B") for n in names) == 12
    for name, p in model.named_parameters():
        if name.endswith("lora_A"):
            continue  # random start; its gradient is B-weighted, so B moving shows the branch trains
        if name.endswith("lora_B"):  # started at zero: moved only if gradients reached it (grad_cp trap)
            assert p.abs().max() > 0, name
        elif name in names:
            assert not torch.equal(p.detach(), base[name]), f"{name} did not train"
        else:
            assert torch.equal(p.detach(), base[name]), f"frozen {name} changed"
    saved = load_weights(tmp_path / "out" / "rwkv-final.pth")
    assert list(saved) == [*names, SETTINGS_KEY]
    slim = lora_state_dict(model, s)  # the saver writes what the one slim-checkpoint function gives
    assert all(torch.equal(saved[key], slim[key]) for key in slim)
    assert decode_settings(saved[SETTINGS_KEY], "x")[0] == s
    assert not (tmp_path / "out" / "rwkv-init.pth").exists()


def test_lora_layers_restricts_modules_and_trained_time_ln(tmp_path, base_file, trained_modules):
    assert run_lora(tmp_path, base_file, "--lora_parts", "att,time,ln", "--lora_layers", "1") == 0
    model = trained_modules[0].model
    base = load_weights(base_file)
    assert [n for n, m in model.named_modules() if isinstance(m, LoraLinear)] == [
        "blocks.1.att.key", "blocks.1.att.value", "blocks.1.att.receptance"]
    for name, p in model.state_dict().items():
        if name.startswith("blocks.0."):
            assert torch.equal(p, base[name]), name
    saved = load_weights(tmp_path / "out" / "rwkv-final.pth")
    assert {k.split(".")[1] for k in saved if k != SETTINGS_KEY} == {"1"}
    assert "blocks.1.att.time_decay" in saved and "blocks.1.ln1.weight" in saved


def test_lora_load_continues_from_a_saved_lora(tmp_path, base_file, trained_modules):
    assert run_lora(tmp_path, base_file) == 0
    first = load_weights(tmp_path / "out" / "rwkv-final.pth")
    assert run_lora(tmp_path, base_file, "--lora_load", str(tmp_path / "out" / "rwkv-final.pth"),
                    "--lr_init", "1e-9", "--lr_final", "1e-9", out="second") == 0
    model = trained_modules[1].model.state_dict()
    for key, value in first.items():
        if key != SETTINGS_KEY:  # an almost-zero LR: the run started from the file
            torch.testing.assert_close(model[key], value, rtol=1e-4, atol=1e-6)


def test_lora_load_missing_file_is_an_error(tmp_path, base_file, capsys):
    assert run_lora(tmp_path, base_file, "--lora_load", str(tmp_path / "rwkv-5")) == 2
    err = capsys.readouterr().err
    assert "--lora_load: file not found" in err and "rwkv-5" in err and err.count("\n") == 1


def lora_flags(base_file, *flags) -> tuple:
    """(settings, lora_load) of a LoRA run's flags, as prepare_lora_training takes them."""
    cfg = parse_args([*TINY, "--lora", "--load_model", str(base_file), "--lora_r", "4", *flags])
    return cfg.lora_settings, cfg.lora_load


def test_lora_load_accepts_original_files_without_settings(tmp_path, base_file):
    source = tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2)
    s = settings(parts=("att", "ln", "time"), alpha=32.0)
    apply_lora(source, s)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    original = {k: v for k, v in lora_state_dict(source, s).items() if k != SETTINGS_KEY}
    save_weights(original, tmp_path / "original.pth")
    model = tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2)
    summary = prepare_lora_training(model, *lora_flags(base_file, "--lora_load", str(tmp_path / "original.pth")))
    assert f"restored {len(original)} tensors" in summary
    state = model.state_dict()
    for key, value in original.items():
        assert torch.equal(state[key], value)


@pytest.mark.parametrize("flags, message", [
    (["--lora_alpha", "16"], "trained with lora_alpha 32, but --lora_alpha is 16"),
    (["--lora_parts", "att"], "holds tensors this run does not train"),
    (["--lora_layers", "0"], "holds tensors this run does not train"),
    (["--lora_r", "8"], "check --lora_r"),
])
def test_lora_load_that_does_not_fit_the_flags(tmp_path, base_file, flags, message):
    source = tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2)
    s = settings(parts=("att", "ln", "time"), r=4, alpha=32.0)
    apply_lora(source, s)
    save_weights(lora_state_dict(source, s), tmp_path / "lora.pth")
    with pytest.raises(UserInputError, match=message):
        prepare_lora_training(tiny_model(vocab_size=DUMMY_VOCAB, n_layer=2),
                              *lora_flags(base_file, "--lora_load", str(tmp_path / "lora.pth"), *flags))
