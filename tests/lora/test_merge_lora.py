"""merge_lora.py / merge_lora_plus.py end to end: merged == base + LoRA, the rwkv pip package, bad input."""
import copy
import os
import signal

import pytest
import torch

import merge_lora
import merge_lora_plus
import src.io.atomic
import src.lora.adapters
import src.lora.merge
from helpers import full_disk_after, rwkv_pip_logits, tiny_model
from src.io.checkpoint import load_weights, save_weights
from src.lora.adapters import SETTINGS_KEY, apply_lora, lora_state_dict, trainable_names
from src.lora.merge import delta_weight
from src.lora.settings import LoraSettings
from src.models.rwkv4.anatomy import LORA_PARTS as PARTS
from src.models.rwkv4.config import ForwardOptions, RWKVConfig
from src.models.rwkv4.model import RWKV

N_LAYER = 3
TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]


def make_lora(base: RWKV, parts=PARTS, layers=range(N_LAYER), r=4, alpha=8.0, zero_b=False, seed=1):
    """A copy of `base` with LoRA on `parts`/`layers`, every trained tensor moved away from its start
    (B non-zero unless zero_b), in eval mode. Returns (model, settings)."""
    model = copy.deepcopy(base)
    settings = LoraSettings(r=r, alpha=alpha, dropout=0.0, parts=tuple(parts), layers=tuple(layers))
    apply_lora(model, settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable_names(model, settings) and not (zero_b and name.endswith("lora_B")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval(), settings


def logits(model: RWKV, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0]


def load_model(path) -> RWKV:
    weights = {k: v.float() for k, v in load_weights(path).items()}
    model = RWKV(RWKVConfig(vocab_size=weights["emb.weight"].shape[0], n_layer=N_LAYER, n_embd=16),
                 ForwardOptions(wkv_backend="torch"))
    model.load_state_dict(weights)
    return model.eval()


@pytest.fixture
def base_model():
    return tiny_model(n_layer=N_LAYER).eval()


@pytest.fixture
def files(tmp_path, base_model):
    """base.pth (fp32), lora.pth (all parts, all layers, settings stored), and the LoRA model itself."""
    lora_model, settings = make_lora(base_model)
    save_weights(base_model.state_dict(), tmp_path / "base.pth")
    save_weights(lora_state_dict(lora_model, settings), tmp_path / "lora.pth")
    return tmp_path / "base.pth", tmp_path / "lora.pth", lora_model


def merge(*argv, plus=False) -> int:
    return (merge_lora_plus if plus else merge_lora).main([str(a) for a in argv])


# ---------------------------------------------------------------- merged == unmerged


def test_merged_equals_unmerged_and_differs_from_base(tmp_path, files, base_model, capsys):
    base, lora, lora_model = files
    out = tmp_path / "out.pth"
    assert merge(base, lora, out) == 0  # alpha read from the stored settings
    assert "alpha 8 stored in the LoRA file" in capsys.readouterr().out
    merged = load_weights(out)
    assert list(merged) == list(load_weights(base))  # the base's key set, no lora keys, no settings
    assert all(v.dtype == torch.float32 for v in merged.values())
    expected = logits(lora_model)
    torch.testing.assert_close(logits(load_model(out)), expected, rtol=1e-5, atol=1e-5)
    assert (logits(base_model) - expected).abs().max() > 0.1  # the LoRA does change the model


def test_merged_file_in_rwkv_pip_gives_our_unmerged_lora_logits(tmp_path, files):
    base, lora, lora_model = files
    assert merge(base, lora, tmp_path / "out.pth") == 0
    theirs = rwkv_pip_logits(tmp_path / "out.pth", TOKENS)
    ours = logits(lora_model)
    assert ((theirs - ours).norm() / ours.norm()).item() <= 1e-4


def test_zero_b_merges_to_the_identity(tmp_path, base_model):
    lora_model, settings = make_lora(base_model, parts=("att", "ffn"), zero_b=True)
    save_weights(base_model.state_dict(), tmp_path / "base.pth")
    save_weights(lora_state_dict(lora_model, settings), tmp_path / "lora.pth")
    assert merge(tmp_path / "base.pth", tmp_path / "lora.pth", tmp_path / "out.pth") == 0
    merged, base = load_weights(tmp_path / "out.pth"), load_weights(tmp_path / "base.pth")
    assert merged.keys() == base.keys() and all(torch.equal(merged[k], base[k]) for k in base)


def test_time_and_ln_values_replace_the_base(tmp_path, files):
    base, lora, _ = files
    assert merge(base, lora, tmp_path / "out.pth") == 0
    merged, trained, original = load_weights(tmp_path / "out.pth"), load_weights(lora), load_weights(base)
    replaced = [k for k in trained if ".time_" in k or ".ln" in k]
    assert len(replaced) == N_LAYER * 11 + 2  # per block ln1, ln2 (x2), 5 att + 2 ffn time_*; block 0 also ln0
    for key in replaced:
        assert torch.equal(merged[key], trained[key]) and not torch.equal(merged[key], original[key])
    assert torch.equal(merged["ln_out.weight"], original["ln_out.weight"])


def test_bf16_base_is_merged_in_fp32_and_written_in_bf16(tmp_path, files):
    base, lora, lora_model = files
    base_bf16 = {k: v.to(torch.bfloat16) for k, v in load_weights(base).items()}
    save_weights(base_bf16, tmp_path / "base16.pth")
    assert merge(tmp_path / "base16.pth", lora, tmp_path / "out.pth") == 0
    merged, trained = load_weights(tmp_path / "out.pth"), load_weights(lora)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    key = "blocks.1.att.key"
    exact = base_bf16[f"{key}.weight"].float() + delta_weight(trained[f"{key}.lora_A"], trained[f"{key}.lora_B"], 2.0)
    assert torch.equal(merged[f"{key}.weight"], exact.to(torch.bfloat16))  # one rounding, at the end
    assert torch.equal(merged["emb.weight"], base_bf16["emb.weight"])
    size = (tmp_path / "out.pth").stat().st_size
    assert size < 1.1 * (tmp_path / "base16.pth").stat().st_size  # not grown to fp32


def test_bf16_lora_file_merges(tmp_path, files):
    base, lora, _ = files
    save_weights(load_weights(lora), tmp_path / "lora16.pth", dtype=torch.bfloat16)  # as a bf16 run saves it
    assert merge(base, tmp_path / "lora16.pth", tmp_path / "out.pth") == 0
    assert load_weights(tmp_path / "out.pth")["blocks.0.att.key.weight"].dtype == torch.float32


# ---------------------------------------------------------------- merge_lora_plus --layer_filter


def test_layer_filter_coefficients(tmp_path, files):
    base, lora, _ = files
    out = tmp_path / "out.pth"
    assert merge("--layer_filter", "0.5*0 2", base, lora, out, plus=True) == 0
    merged, trained, original = load_weights(out), load_weights(lora), load_weights(base)
    for layer, coef in ((0, 0.5), (2, 1.0)):
        key = f"blocks.{layer}.ffn.value"
        expected = original[f"{key}.weight"] + delta_weight(trained[f"{key}.lora_A"], trained[f"{key}.lora_B"],
                                                            coef * 8.0 / 4)
        torch.testing.assert_close(merged[f"{key}.weight"], expected, rtol=0, atol=0)
        # time/ln values of listed layers are taken as trained, whatever the coefficient
        assert torch.equal(merged[f"blocks.{layer}.att.time_decay"], trained[f"blocks.{layer}.att.time_decay"])
    for key in merged:  # layer 1 is not listed: every tensor of it stays the base's
        if key.startswith("blocks.1."):
            assert torch.equal(merged[key], original[key]), key


def test_layer_filter_coefficients_change_the_model_as_scaled_lora(tmp_path, files, base_model):
    base, lora, lora_model = files
    assert merge("--layer_filter", "0-2", base, lora, tmp_path / "all.pth", plus=True) == 0
    assert merge("--layer_filter", "0*0-2", base, lora, tmp_path / "zero.pth", plus=True) == 0
    torch.testing.assert_close(logits(load_model(tmp_path / "all.pth")), logits(lora_model), rtol=1e-5, atol=1e-5)
    # coefficient 0: only the time/ln values remain
    no_delta = copy.deepcopy(lora_model)
    for module in no_delta.modules():
        if isinstance(module, src.lora.adapters.LoraLinear):
            module.scale = 0.0
    torch.testing.assert_close(logits(load_model(tmp_path / "zero.pth")), logits(no_delta), rtol=1e-5, atol=1e-5)


def test_plus_without_filter_is_merge_lora(tmp_path, files):
    base, lora, _ = files
    assert merge(base, lora, tmp_path / "a.pth") == 0
    assert merge(base, lora, tmp_path / "b.pth", plus=True) == 0
    a, b = load_weights(tmp_path / "a.pth"), load_weights(tmp_path / "b.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the original toolkit's usage and files


def original_merge(base: dict, lora: dict, alpha: float) -> dict:
    """The original toolkit's merge_lora.py, rewritten: base and LoRA keys together; W + B A · alpha/r wherever
    <prefix>.lora_A exists; every other key containing "lora" dropped."""
    w = {**base, **lora}
    out = {}
    for key in list(w):
        prefix = key[:-len(".weight")]
        if key.endswith(".weight") and f"{prefix}.lora_A" in w:
            A, B = w[f"{prefix}.lora_A"], w[f"{prefix}.lora_B"]
            out[key] = w[key] + B @ A * (alpha / B.shape[1])
        elif "lora" not in key:
            out[key] = w[key]
    return out


def test_our_lora_files_still_merge_with_the_original_procedure(tmp_path, files):
    base, lora, _ = files
    assert merge(8, base, lora, tmp_path / "out.pth") == 0  # the original command line, alpha agreeing
    ours = load_weights(tmp_path / "out.pth")
    theirs = original_merge(load_weights(base), load_weights(lora), 8.0)
    assert sorted(theirs) == sorted(ours)  # the settings key is dropped, like every other "lora" key
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6)


def test_original_lora_file_without_settings_needs_alpha(tmp_path, files, capsys):
    base, lora, _ = files
    original = {k: v for k, v in load_weights(lora).items() if k != SETTINGS_KEY}
    save_weights(original, tmp_path / "original.pth")
    out = tmp_path / "out.pth"
    assert merge(base, tmp_path / "original.pth", out) == 2
    assert "stores no LoRA settings" in capsys.readouterr().err and not out.exists()
    assert merge(8, base, tmp_path / "original.pth", out) == 0
    assert merge(base, lora, tmp_path / "ours.pth") == 0
    a, b = load_weights(out), load_weights(tmp_path / "ours.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_use_gpu_without_a_gpu(tmp_path, files, capsys):
    base, lora, _ = files
    assert merge("--use-gpu", base, lora, tmp_path / "out.pth") == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()


@pytest.mark.gpu
def test_use_gpu_merges_like_the_cpu(tmp_path, files):
    base, lora, _ = files
    assert merge(base, lora, tmp_path / "cpu.pth") == 0
    assert merge("--use-gpu", base, lora, tmp_path / "gpu.pth") == 0
    on_cpu, on_gpu = load_weights(tmp_path / "cpu.pth"), load_weights(tmp_path / "gpu.pth")
    assert on_cpu.keys() == on_gpu.keys()
    for key in on_cpu:
        torch.testing.assert_close(on_gpu[key], on_cpu[key], rtol=1e-5, atol=1e-6)


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_:
        merge_lora.main(["-h"])
    assert exit_.value.code == 0 and "lora_alpha" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: one message, nothing written


def save_variant(tmp_path, name, weights):
    save_weights(weights, tmp_path / name)
    return tmp_path / name


def bad_lora_cases(tmp_path, base, lora):
    """name -> (argv, words the message must contain)."""
    ours = load_weights(lora)
    original = {k: v for k, v in ours.items() if k != SETTINGS_KEY}
    wide = dict(original, **{"blocks.0.att.key.lora_A": torch.zeros(4, 32)})
    half = {k: v for k, v in ours.items() if k != "blocks.1.ffn.key.lora_B"}
    deeper, settings = make_lora(tiny_model(n_layer=N_LAYER + 1), layers=[N_LAYER])
    deeper_file = {k: v for k, v in lora_state_dict(deeper, settings).items() if k != SETTINGS_KEY}
    other_vocab, settings = make_lora(tiny_model(vocab_size=50, n_layer=N_LAYER))
    nan = dict(ours, **{"blocks.2.att.time_first": torch.full((16,), float("nan"))})
    full = load_weights(base)
    on_emb = dict(original, **{"emb.lora_A": torch.ones(4, 16), "emb.lora_B": torch.ones(37, 4)})
    return {
        "shapes": ([8, base, save_variant(tmp_path, "wide.pth", wide)], ["lora_B @ lora_A is 16 x 32", "(16, 16)"]),
        "A without B": ([base, save_variant(tmp_path, "half.pth", half)],
                        ["blocks.1.ffn.key.lora_A but no blocks.1.ffn.key.lora_B"]),
        "layer the base lacks": ([8, base, save_variant(tmp_path, "deep.pth", deeper_file)],
                                 ["for layer 3", "has 3 layers (0-2)"]),
        "base is a LoRA file": ([lora, lora], ["is itself a LoRA checkpoint"]),
        "full model as LoRA": ([8, base, base], ["emb.weight", "LoRA training never saves"]),
        "missing base": ([tmp_path / "nope.pth", lora], ["base model: file not found", "nope.pth"]),
        "missing lora": ([base, tmp_path / "rwkv-9"], ["LoRA checkpoint: file not found", "rwkv-9"]),
        "alpha disagrees": ([16, base, lora], ["lora_alpha 16", "lora_alpha 8 stored"]),
        "other base": ([base, save_variant(tmp_path, "v50.pth", lora_state_dict(other_vocab, settings))],
                       ["another base model", "vocab_size 50 vs 37"]),
        "LoRA on the embedding": ([8, base, save_variant(tmp_path, "emb.pth", on_emb)],
                                  ["emb.lora_A, but emb is not a Linear layer"]),
        "nan": ([base, save_variant(tmp_path, "nan.pth", nan)], ["blocks.2.att.time_first", "NaN"]),
        "bad alpha": (["x", base, lora], ["lora_alpha must be a positive number"]),
        "not a model": ([save_variant(tmp_path, "junk.pth", {"x": torch.zeros(2)}), lora], ["no emb.weight"]),
        "full base missing a key": ([save_variant(tmp_path, "cut.pth", {k: v for k, v in full.items()
                                                                          if k != "head.weight"}), lora],
                                    ["does not have the layout", "head.weight"]),
    }


CASES = ["shapes", "A without B", "layer the base lacks", "base is a LoRA file", "full model as LoRA", "missing base",
         "missing lora", "alpha disagrees", "other base", "LoRA on the embedding", "nan", "bad alpha", "not a model",
         "full base missing a key"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_message_and_writes_nothing(tmp_path, files, capsys, case):
    base, lora, _ = files
    argv, words = bad_lora_cases(tmp_path, base, lora)[case]
    out = tmp_path / "out" / "merged.pth"
    assert merge(*argv, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("merge_lora.py: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert not out.parent.exists()


@pytest.mark.parametrize("spec, words", [("0-3", "lists layer 3, but"), ("0.5*", "cannot read '0.5*'")])
def test_bad_layer_filter(tmp_path, files, capsys, spec, words):
    base, lora, _ = files
    assert merge("--layer_filter", spec, base, lora, tmp_path / "out.pth", plus=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("merge_lora_plus.py: error: --layer_filter") and words in err
    assert not (tmp_path / "out.pth").exists()


def test_output_must_not_overwrite_an_input(files, capsys):
    base, lora, _ = files
    before = base.read_bytes()
    assert merge(base, lora, base) == 2
    assert "is the base model" in capsys.readouterr().err and base.read_bytes() == before


def test_a_wrong_merge_is_refused_by_the_logit_check(tmp_path, files, capsys, monkeypatch):
    base, lora, _ = files
    monkeypatch.setattr(src.lora.merge, "delta_weight", lambda A, B, scale: 1.01 * (B.float() @ A.float()) * scale)
    assert merge(base, lora, tmp_path / "out.pth") == 2
    err = capsys.readouterr().err
    assert "merge check failed: merged and unmerged logits differ" in err and "nothing written" in err
    assert not (tmp_path / "out.pth").exists()


# ---------------------------------------------------------------- the output: never replaced unasked, checked first


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, files, capsys):
    base, lora, _ = files
    out = tmp_path / "rwkv-3.pth"  # e.g. a training checkpoint
    out.write_bytes(b"earlier work")
    for plus in (False, True):
        assert merge(base, lora, out, plus=plus) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"the output {out} already exists" in err and "--overwrite" in err, err
        assert out.read_bytes() == b"earlier work"
    assert merge("--overwrite", base, lora, out) == 0
    assert list(load_weights(out)) == list(load_weights(base))


@pytest.mark.parametrize("output, message", [
    ("{tmp}", "is a folder; give a file name"),
    ("{tmp}/base.pth/merged.pth", "lies inside the base model"),
    ("/proc/rwkv-infctx-test.pth", "cannot create files in /proc ("),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_merge(tmp_path, files, capsys, output, message):
    base, lora, _ = files
    assert merge("--overwrite", base, lora, output.format(tmp=tmp_path), plus=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("merge_lora_plus.py: error: the output ") and err.count("\n") == 1 and message in err, err


def test_a_full_disk_while_writing_the_merge_is_one_line(tmp_path, files, capsys, monkeypatch):
    base, lora, _ = files
    monkeypatch.setattr(src.io.atomic, "_write", full_disk_after(1000))
    assert merge(base, lora, tmp_path / "out" / "merged.pth") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"merge_lora.py: error: no space left on the device of {tmp_path / 'out'} for merged.pth "
                          f"(about ") and err.count("\n") == 1, err
    assert not list((tmp_path / "out").iterdir())


def test_sigterm_while_writing_the_merge_leaves_nothing(tmp_path, files, capsys, monkeypatch):
    """A real SIGTERM arriving while torch.save writes (torch turns exceptions inside its writes into its own)."""
    base, lora, _ = files

    def terminated(file, data):
        os.kill(os.getpid(), signal.SIGTERM)
        return file.write(data)

    monkeypatch.setattr(src.io.atomic, "_write", terminated)
    assert merge(base, lora, tmp_path / "out" / "merged.pth") == 143
    err = capsys.readouterr().err
    assert err == "merge_lora.py: SIGTERM: stopped; nothing was written\n", err
    assert not list((tmp_path / "out").iterdir())


def test_an_output_written_by_another_merge_meanwhile_is_kept(tmp_path, files, capsys, monkeypatch):
    base, lora, _ = files
    out = tmp_path / "merged.pth"

    def other_merge_finishes_first(file, data):
        if not out.exists():
            out.write_bytes(b"the other merge's")
        return file.write(data)

    monkeypatch.setattr(src.io.atomic, "_write", other_merge_finishes_first)
    assert merge(base, lora, out) == 2
    err = capsys.readouterr().err
    assert f"{out} was written by another command while this one ran; it is left as it is" in err, err
    assert out.read_bytes() == b"the other merge's" and not list(tmp_path.glob(".*"))
