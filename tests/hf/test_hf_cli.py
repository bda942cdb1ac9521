"""export_hf.py and import_hf.py end to end, against the real transformers: logits, greedy generation, the exact
round trip, the 20B tokenizer, refusals and output-path rules.

The trained model is a real train.py run (conftest's TINY_RUN with two layers: transformers cannot load an RWKV
of one layer)."""
import contextlib
import io
import json
import re
import shutil

import pytest
import torch

import export_hf
import import_hf
import train
from conftest import TINY_RUN
from helpers import TOKENIZER_20B_PARTS, folder_snapshot, package_file, refused_in_one_line, rwkv_pip_logits, tiny_model
from src.io.checkpoint import load_weights, save_weights
from src.errors import UserInputError
from src.hf.cli import check_logits
from src.lora.adapters import apply_lora, lora_state_dict
from src.models.rwkv4.anatomy import config_of_weights
from src.models.rwkv4.family import RWKV4
from src.lora.settings import LoraSettings
from src.models.rwkv4.hf_format import hf_config, hf_name
from src.data.tokenizer import HFTokenizer

pytest.importorskip("transformers")  # in requirements.txt; a GPU machine staged without it skips these
from transformers import AutoTokenizer, RwkvConfig, RwkvForCausalLM  # noqa: E402

TWO_LAYERS = [*TINY_RUN, "--n_layer", "2"]  # a later flag wins
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """rwkv-final.pth of a finished two-layer TINY_RUN."""
    proj_dir = tmp_path_factory.mktemp("trained") / "out"
    assert train.main([*TWO_LAYERS, "--proj_dir", str(proj_dir)]) == 0
    return proj_dir / "rwkv-final.pth"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(the export folder of `trained`, what export_hf.py printed)."""
    out_dir = tmp_path_factory.mktemp("exported") / "hf"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert export_hf.main([str(trained), str(out_dir)]) == 0
    return out_dir, printed.getvalue()


def ours(path):
    weights = load_weights(path)
    return RWKV4.from_weights(config_of_weights(weights), weights, "cpu")


@torch.no_grad()
def greedy(model, prompt, count) -> list:
    """Our model's greedy continuation, one token at a time through the recurrent state."""
    logits, state = model(torch.tensor([prompt]))
    tokens = []
    for _ in range(count):
        tokens.append(int(logits[0, -1].argmax()))
        logits, state = model(torch.tensor([tokens[-1:]]), state)
    return tokens


def refused(main, argv, capsys, prog, *expected) -> str:
    return refused_in_one_line(argv, capsys, *expected, main=main, prog=prog)


# ---------------------------------------------------------------- export


@torch.no_grad()
def test_export_loads_in_transformers_with_our_logits_and_greedy_tokens(trained, exported):
    out_dir, printed = exported
    theirs = RwkvForCausalLM.from_pretrained(out_dir).eval()
    model = ours(trained)
    assert theirs.dtype == torch.float32 and theirs.config.num_hidden_layers == 2
    difference = (theirs(torch.tensor([PROMPT])).logits - model(torch.tensor([PROMPT]))[0]).abs().max().item()
    assert difference <= 1e-4, difference
    generated = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False)[0, len(PROMPT):]
    assert generated.tolist() == greedy(model, PROMPT, 20)
    # the check's figure on the CPU: fp32 rounding only (our time-mix is one lerp, transformers' two products)
    figure = re.search(r"within (\S+) \(computed in fp32, tolerance 1e-04\)", printed)
    assert figure and float(figure[1]) <= 1e-6, printed


def test_the_check_fails_when_the_folder_holds_other_weights(trained, exported):
    out_dir, _ = exported
    weights = load_weights(trained)
    other = {k: v + 0.01 if k.endswith("ffn.value.weight") else v for k, v in weights.items()}
    with pytest.raises(UserInputError, match="check failed: transformers' logits differ from this toolkit's by"):
        check_logits(config_of_weights(weights), other, out_dir, "the test")


def test_import_of_the_export_is_the_original_bit_for_bit(trained, exported, tmp_path):
    out_dir, _ = exported
    assert import_hf.main([str(out_dir), str(tmp_path / "back.pth")]) == 0
    original, back = torch.load(trained), torch.load(tmp_path / "back.pth")
    assert list(back) == list(original)
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)


def test_the_imported_file_loads_in_train_py_and_the_rwkv_package(trained, exported, tmp_path):
    out_dir, _ = exported
    assert import_hf.main([str(out_dir), str(tmp_path / "back.pth")]) == 0
    expected = ours(trained)(torch.tensor([PROMPT]))[0][0].detach()
    assert torch.allclose(rwkv_pip_logits(tmp_path / "back.pth", PROMPT), expected, atol=1e-4)
    assert train.main([*TWO_LAYERS, "--proj_dir", str(tmp_path / "again"), "--load_model", str(tmp_path / "back.pth"),
                       "--epoch_count", "1"]) == 0


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_export_stores_that_dtype_and_imports_it_back(trained, tmp_path, dtype, torch_dtype):
    assert export_hf.main([str(trained), str(tmp_path / "hf"), "--dtype", dtype]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == str(torch_dtype).split(".")[1]
    assert import_hf.main([str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    original, back = torch.load(trained), torch.load(tmp_path / "back.pth")
    assert all(back[k].dtype == torch_dtype and torch.equal(back[k], original[k].to(torch_dtype)) for k in original)


def test_20b_tokenizer_round_trip_encodes_a_sentence_identically(tmp_path):
    tokenizer_file = package_file(*TOKENIZER_20B_PARTS)
    save_weights(tiny_model(vocab_size=50277, n_embd=8).state_dict(), tmp_path / "pile.pth")
    assert export_hf.main([str(tmp_path / "pile.pth"), str(tmp_path / "hf"), "--vocab", "20B_tokenizer.json",
                           "--ctx_len", "1024"]) == 0
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sentence = "Hello world!  The quick brown fox\n\njumps over 13 lazy dogs: 日本語, ça va? <|endoftext|>"
    ids = HFTokenizer.from_file(tokenizer_file).encode(sentence)
    assert theirs(sentence)["input_ids"] == ids and theirs.decode(ids) == sentence
    assert theirs.eos_token_id == 0 and theirs.model_max_length == 1024
    assert RwkvConfig.from_pretrained(tmp_path / "hf").max_position_embeddings == 1024


def test_world_vocabulary_is_refused_with_the_reason(tmp_path, capsys):
    package_file("rwkv")
    save_weights(tiny_model(vocab_size=65536, n_embd=8).state_dict(), tmp_path / "world.pth")
    refused(export_hf.main, [str(tmp_path / "world.pth"), str(tmp_path / "hf"), "--vocab", "rwkv_vocab_v20230424.txt"],
            capsys, "export_hf.py", "no tokenizer for the RWKV World vocabulary", "greedy longest match")
    assert not (tmp_path / "hf").exists()


def lora_file(path):
    model = tiny_model()
    settings = LoraSettings(r=2, alpha=4.0, dropout=0.0, parts=("att",), layers=(0, 1))
    apply_lora(model, settings)
    save_weights(lora_state_dict(model, settings), path)


def damaged_file(path, trained):
    path.write_bytes(trained.read_bytes()[:3000])


def layout_file(path, overrides):
    save_weights(tiny_model(**overrides).state_dict(), path)


@pytest.mark.parametrize("make, expected", [
    (lambda path, trained: layout_file(path, {"pre_ffn": 1}), ["pre_ffn (layer 0 has a channel-mix"]),
    (lambda path, trained: layout_file(path, {"head_qk": 4}), ["head_qk 4"]),
    (lambda path, trained: layout_file(path, {"tiny_att_dim": 4, "tiny_att_layer": 1}), ["tiny attention"]),
    (lambda path, trained: layout_file(path, {"my_pos_emb": 4}), ["my_pos_emb 4"]),
    (lambda path, trained: layout_file(path, {"dim_att": 32}), ["dim_att 32 != n_embd 16"]),
    (lambda path, trained: layout_file(path, {"n_layer": 1}), ["n_layer 1"]),
    (lambda path, trained: lora_file(path), ["LoRA checkpoint", "python merge_lora.py BASE.pth"]),
    (damaged_file, ["damaged PyTorch file"]),
], ids=["pre_ffn", "head_qk", "tiny_att", "my_pos_emb", "dim_att", "one_layer", "lora", "damaged"])
def test_files_transformers_cannot_hold_are_refused_in_one_line(make, expected, trained, tmp_path, capsys):
    make(tmp_path / "model.pth", trained)
    refused(export_hf.main, [str(tmp_path / "model.pth"), str(tmp_path / "hf")], capsys, "export_hf.py", *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_a_non_empty_out_dir_is_replaced_only_when_asked(trained, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    refused(export_hf.main, [str(trained), str(tmp_path / "hf")], capsys, "export_hf.py", "--overwrite")
    assert folder_snapshot(tmp_path / "hf") == {"notes.txt": b"mine"}
    assert export_hf.main([str(trained), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert not (tmp_path / "hf" / "notes.txt").exists() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left behind


def test_out_dir_holding_the_model_is_refused(trained, tmp_path, capsys):
    shutil.copy(trained, tmp_path / "model.pth")
    refused(export_hf.main, [str(tmp_path / "model.pth"), str(tmp_path), "--overwrite"], capsys, "export_hf.py",
            "holds MODEL")


# ---------------------------------------------------------------- import


@torch.no_grad()
def test_import_reads_sharded_safetensors_written_by_transformers(tmp_path):
    """A randomly initialised RwkvForCausalLM saved by transformers itself, in shards, with rescale_every 2."""
    torch.manual_seed(0)
    cfg = config_of_weights(tiny_model(n_layer=8).state_dict())
    RwkvForCausalLM(RwkvConfig(**{**hf_config(cfg, context_length=64), "rescale_every": 2})).save_pretrained(
        tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert import_hf.main([str(tmp_path / "hf"), str(tmp_path / "imported.pth")]) == 0
    got = ours(tmp_path / "imported.pth")(torch.tensor([PROMPT]))[0]
    as_trained = RwkvForCausalLM.from_pretrained(tmp_path / "hf", rescale_every=0).eval()
    assert (got - as_trained(torch.tensor([PROMPT])).logits).abs().max() <= 1e-4
    # transformers' inference-time rescaling moves the logits (the reason export writes rescale_every 0)
    rescaled = RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (got - rescaled(torch.tensor([PROMPT])).logits).abs().max() > 1e-4


def test_import_reads_pytorch_model_bin(tmp_path):
    """Older checkpoints on the Hub hold pytorch_model.bin."""
    source = tiny_model(n_layer=2).state_dict()
    (tmp_path / "hf").mkdir()
    config = {**hf_config(config_of_weights(source), context_length=64), "model_type": "rwkv"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    torch.save({hf_name(k): v for k, v in source.items()}, tmp_path / "hf" / "pytorch_model.bin")
    assert import_hf.main([str(tmp_path / "hf"), str(tmp_path / "imported.pth")]) == 0
    assert all(torch.equal(load_weights(tmp_path / "imported.pth")[k], v) for k, v in source.items())


def test_import_refuses_in_one_line(exported, tmp_path, capsys):
    out_dir, _ = exported
    damaged = shutil.copytree(out_dir, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes((out_dir / "model.safetensors").read_bytes()[:1000])
    other = shutil.copytree(out_dir, tmp_path / "other")
    (other / "config.json").write_text(json.dumps({"model_type": "rwkv5", "vocab_size": 65536}))
    (tmp_path / "no_config").mkdir()
    cases = {tmp_path / "nowhere": "is not a folder", tmp_path / "no_config": "has no config.json",
             damaged: "damaged safetensors file", other: "'rwkv5' model"}
    for folder, expected in cases.items():
        refused(import_hf.main, [str(folder), str(tmp_path / "out.pth")], capsys, "import_hf.py", expected)
    assert not (tmp_path / "out.pth").exists()


def test_an_existing_out_pth_is_replaced_only_when_asked(exported, tmp_path, capsys):
    out_dir, _ = exported
    (tmp_path / "out.pth").write_bytes(b"mine")
    refused(import_hf.main, [str(out_dir), str(tmp_path / "out.pth")], capsys, "import_hf.py", "--overwrite")
    assert (tmp_path / "out.pth").read_bytes() == b"mine"
    assert import_hf.main([str(out_dir), str(tmp_path / "out.pth"), "--overwrite"]) == 0
    assert len(load_weights(tmp_path / "out.pth")) > 0
