"""RWKV-7 files that are damaged or of another family, through the real command lines: each is refused with exit 2
and one line naming the file and what is wrong with it, never a traceback or another family's list of keys."""
import copy

import pytest
import torch

import evaluate
import merge_lora
import train
from helpers import refused_in_one_line
from helpers import tiny_model as rwkv4_model
from src.io.checkpoint import save_weights
from src.lora.adapters import apply_lora, lora_state_dict
from src.lora.settings import LoraSettings
from src.models.rwkv7.config import RWKV7Config
from src.models.rwkv7.family import RWKV7
from src.models.rwkv7.model import generate_init_weights

DUMMY_VOCAB = 13  # characters of the built-in dummy data
RUN = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "32", "--head_size", "8", "--ctx_len", "16",
       "--micro_bsz", "2", "--epoch_steps", "1", "--epoch_count", "1", "--epoch_save", "0",
       "--enable_progress_bar", "0"]


def rwkv7_model():
    model = RWKV7.build(RWKV7Config(vocab_size=DUMMY_VOCAB, n_layer=2, n_embd=32, head_size=8))
    model.load_state_dict(generate_init_weights(model))
    return model


def rwkv7_weights() -> dict:
    return rwkv7_model().state_dict()


def lora_of(model) -> dict:
    """The LoRA file of `model`: adapters on att and ffn, time and ln trained whole, in both layers."""
    model = copy.deepcopy(model)
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, parts=("att", "ffn", "time", "ln"), layers=(0, 1))
    apply_lora(model, settings)
    return lora_state_dict(model, settings)


@pytest.mark.parametrize("key, expected", [
    ("blocks.0.att.r_k", "is not a full RWKV-7 model (it has no blocks.0.att.r_k)"),
    ("blocks.0.att.w0", "missing keys (1): blocks.0.att.w0"),
])
def test_a_file_lacking_one_of_block_0s_marks_is_refused_as_rwkv7(tmp_path, capsys, key, expected):
    """w0 or r_k alone marks the file as RWKV-7: it is not read as an RWKV-4 model missing all of RWKV-4's keys."""
    weights = rwkv7_weights()
    del weights[key]
    save_weights(weights, tmp_path / "model.pth")
    err = refused_in_one_line([*RUN, "--load_model", str(tmp_path / "model.pth"), "--proj_dir", str(tmp_path / "out")],
                              capsys, str(tmp_path / "model.pth"), expected)
    assert "time_decay" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, shape", [("emb.weight", (DUMMY_VOCAB,)), ("blocks.0.att.r_k", (32,)),
                                        ("blocks.0.att.w1", (32,)), ("blocks.1.att.v1", (32, 32, 1))])
def test_a_tensor_of_another_rank_is_refused_in_one_line(tmp_path, capsys, key, shape):
    """The widths are read from these tensors' shapes: a damaged one was an IndexError or a ValueError."""
    model = rwkv7_model()
    save_weights({**model.state_dict(), key: torch.zeros(shape)}, tmp_path / "model.pth")
    save_weights(lora_of(model), tmp_path / "lora.pth")
    expected = (str(tmp_path / "model.pth"), f"its {key} has shape {shape}, where an RWKV-7 model has a matrix")
    refused_in_one_line(["--load_model", str(tmp_path / "model.pth"), "--data_type", "dummy"], capsys, *expected,
                        main=evaluate.main, prog="evaluate.py")
    refused_in_one_line([str(tmp_path / "model.pth"), str(tmp_path / "lora.pth"), str(tmp_path / "merged.pth")],
                        capsys, *expected, main=merge_lora.main, prog="merge_lora.py")


def test_evaluate_and_merge_name_the_keys_of_a_file_that_lost_or_gained_one(tmp_path, capsys):
    model = rwkv7_model()
    gained = {**model.state_dict(), "blocks.1.att.extra": torch.zeros(3)}
    both = {k: v for k, v in gained.items() if k != "blocks.1.att.k_k"}
    save_weights(both, tmp_path / "both.pth")
    layout = "does not have the layout of an RWKV-7 model"
    refused_in_one_line(["--load_model", str(tmp_path / "both.pth"), "--data_type", "dummy"], capsys,
                        f"{tmp_path / 'both.pth'} {layout}", "missing keys (1): blocks.1.att.k_k",
                        "unexpected keys (1): blocks.1.att.extra", "pass the file as its run or release wrote it",
                        main=evaluate.main, prog="evaluate.py")
    # merge_lora.py checks the LoRA's keys against the base first: a base that lost one is refused there
    save_weights(gained, tmp_path / "gained.pth")
    save_weights(lora_of(model), tmp_path / "lora.pth")
    refused_in_one_line([str(tmp_path / "gained.pth"), str(tmp_path / "lora.pth"), str(tmp_path / "merged.pth")],
                        capsys, f"{tmp_path / 'gained.pth'} {layout}", "unexpected keys (1): blocks.1.att.extra",
                        "pass the file as its run or release wrote it", main=merge_lora.main, prog="merge_lora.py")
    assert not (tmp_path / "merged.pth").exists()


def test_a_truncated_file_is_not_called_an_rwkv4_checkpoint(tmp_path, capsys):
    save_weights(rwkv7_weights(), tmp_path / "model.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:20000])
    err = refused_in_one_line([*RUN, "--my_testing", "x070", "--load_model",
                               str(tmp_path / "cut.pth"), "--proj_dir", str(tmp_path / "out")], capsys,
                              f"{tmp_path / 'cut.pth'} is a damaged PyTorch file (truncated or corrupted)")
    assert "RWKV-4" not in err


@pytest.mark.parametrize("base_family", ["rwkv4", "rwkv7"])
def test_lora_load_of_another_familys_lora_names_both_families(tmp_path, capsys, base_family):
    """train.py --lora_load says what merge_lora.py says of the same pair (the file's identity has fields of the other
    family only: listing them told nothing)."""
    rwkv7, rwkv4 = rwkv7_model(), rwkv4_model(vocab_size=DUMMY_VOCAB, n_layer=2, n_embd=32)
    base, other = (rwkv4, rwkv7) if base_family == "rwkv4" else (rwkv7, rwkv4)
    save_weights(base.state_dict(), tmp_path / "base.pth")
    save_weights(lora_of(other), tmp_path / "lora.pth")
    titles = {"rwkv4": "RWKV-4", "rwkv7": "RWKV-7"}
    base_title, lora_title = titles[base_family], titles["rwkv7" if base_family == "rwkv4" else "rwkv4"]
    refused_in_one_line([*RUN, "--load_model", str(tmp_path / "base.pth"), "--lora", "--lora_r", "4",
                         "--lora_alpha", "8", "--lora_load", str(tmp_path / "lora.pth"),
                         "--proj_dir", str(tmp_path / "out")], capsys,
                        f"--lora_load {tmp_path / 'lora.pth'} was trained on an {lora_title} model, but --load_model "
                        f"is an {base_title} model; pass the base it was trained on to --load_model.")
