"""train.py's command line: the golden flag set with the fork's defaults, help, validation."""
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import preprocess_data
import train
from src.config import TrainConfig, build_parser, flag_names, parse_args
from src.errors import UserInputError

# Every flag of the fork's RWKV-v4neo-lora/train.py with its default, as the fork's argparse declares it.
FORK_FLAGS = {
    "load_model": "", "wandb": "", "proj_dir": "out", "random_seed": -1, "data_file": "",
    "train_split_ratio": None, "train_data_sort": None, "data_type": "utf-8", "select_name": None,
    "vocab_size": 0, "ctx_len": 1024, "initial_ctx_len": None, "ctx_warmup_steps": 1, "ctx_parts": None,
    "epoch_steps": 1000, "epoch_count": 500, "epoch_begin": 0, "epoch_save": 5, "previous_step": None,
    "log_add_step": 0, "micro_bsz": 12, "n_layer": 6, "n_embd": 512, "dim_att": 0, "dim_ffn": 0, "pre_ffn": 0,
    "head_qk": 0, "tiny_att_dim": 0, "tiny_att_layer": -999, "lr_init": 6e-4, "lr_final": 1e-5,
    "warmup_steps": 0, "beta1": 0.9, "beta2": 0.99, "adam_eps": 1e-8, "grad_cp": 0, "state_cp": 0,
    "my_pile_stage": 0, "my_pile_shift": -1, "my_pile_edecay": 0, "layerwise_lr": 1, "ds_bucket_mb": 200,
    "weight_decay": 0, "my_img_version": "0", "my_img_size": 0, "my_img_bit": 0, "my_img_clip": "x",
    "my_img_clip_scale": 1, "my_img_l1_scale": 0, "my_img_encoder": "x", "my_sample_len": 0, "my_ffn_shift": 1,
    "my_att_shift": 1, "my_pos_emb": 0, "load_partial": 0, "magic_prime": 0, "my_qa_mask": 0, "my_testing": "",
    "lora": False, "lora_load": "", "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.01,
    "lora_parts": "att,ln,time", "lora_layers": None, "my_script_align": 0, "my_script_mask": None,
    "accumulate_grad_batches_dict": None, "instruct_data_file": "", "instruct_data_ratio": 0.0,
    "names_data_file": None, "debug": False,
}
# Lightning Trainer arguments users pass (the original took them through add_argparse_args).
LIGHTNING_FLAGS = {
    "accelerator": "auto", "devices": "auto", "num_nodes": 1, "precision": "fp32", "strategy": "auto",
    "accumulate_grad_batches": 1, "max_epochs": None, "max_steps": -1, "gradient_clip_val": 1.0,
    "enable_progress_bar": 1,
}
# Ours: not in the original.
OWN_FLAGS = {"wkv_backend": "auto", "compile": 1, "vocab_file": "", "resume": "", "overwrite_proj_dir": 0,
             "valid_data_file": "", "valid_data_type": None, "valid_every": 1, "valid_tokens": 0,
             # model families' own shape flags (src/models/<family>/flags.py)
             "head_size": 64, "d_decay_lora": 0, "d_aaa_lora": 0, "d_mv_lora": 0, "d_gate_lora": 0,
             "estimate_memory": 0}


def test_golden_flag_set_and_defaults():
    expected = {**FORK_FLAGS, **LIGHTNING_FLAGS, **OWN_FLAGS}
    assert sorted(flag_names()) == sorted(expected)
    defaults = vars(build_parser().parse_args([]))
    for name, default in expected.items():
        assert defaults[name] == default, name


def test_help_groups_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for title in ("data:", "model shape:", "optimisation and schedule:", "LoRA:", "long context:",
                  "Lightning trainer", "BlinkDL-internal experiments"):
        assert title in text
    for name in flag_names():
        assert f"--{name}" in text


def help_of_each_flag(text: str) -> dict:
    """{flag name: its help entry, on one line} from an argparse --help text."""
    entries, name = {}, None
    for line in text.splitlines():
        match = re.match(r"  (?:-\w, )?--([\w-]+)", line)
        if match:
            name = match.group(1)
            entries[name] = line.strip()
        elif name and line.startswith("    "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


def test_help_tells_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    entries = help_of_each_flag(text)
    assert sorted(entries) == sorted(["help", *flag_names()])
    for name, entry in entries.items():
        assert entry.count("default") <= 1, entry
        assert not re.search(r"\(default: (None|False|)\)", entry), entry
    assert not any("not built" in entry for entry in entries.values())  # every fork flag works
    assert "wds_img" not in text  # accepted only to be refused by name
    assert ("--epoch_steps EPOCH_STEPS Micro-batches per GPU in one mini-epoch. (default: 1000)"
            in entries["epoch_steps"])
    with pytest.raises(SystemExit):
        preprocess_data.main(["--help"])
    for entry in help_of_each_flag(capsys.readouterr().out).values():
        assert not re.search(r"\(default: (None|False|)\)", entry), entry


def test_flags_lora_included_are_checked_without_importing_torch():
    """--help and every flag check stay fast: src.config never imports torch, not even for the --lora_* flags."""
    code = ("import sys; from src.config import parse_args; "
            "cfg = parse_args(['--data_type', 'dummy', '--lora', '--load_model', 'base.pth', '--lora_layers', '0-2']); "
            "assert cfg.lora_settings.layers == (0, 1, 2), cfg.lora_settings; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_derived_values():
    cfg = parse_args(["--data_type", "dummy", "--n_embd", "64", "--ctx_len", "100", "--ctx_parts", "3"])
    assert (cfg.dim_att, cfg.dim_ffn, cfg.ctx_part_len) == (64, 256, 34)
    assert cfg.betas == (0.9, 0.99) and cfg.timestamp


@pytest.mark.parametrize("flag, value", [("--my_testing", "a"), ("--my_qa_mask", "1"), ("--my_img_size", "64"),
                                         ("--my_script_align", "1"), ("--my_att_shift", "0")])
def test_internal_experiments_are_refused_by_name(flag, value, capsys):
    assert train.main(["--data_type", "dummy", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "not supported" in err and err.count("\n") == 1


def test_image_data_type_is_refused():
    with pytest.raises(UserInputError, match="wds_img"):
        parse_args(["--data_type", "wds_img", "--data_file", "x"])


def test_unknown_precision_names_the_flag_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data_type", "dummy", "--precision", "bf17"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "bf17" in err and "'fp32', 'tf32', 'fp16', 'bf16'" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--data_type", "binidx"], "--data_file is required"),
    (["--data_type", "dummy", "--micro_bsz", "0"], "--micro_bsz 0 must be in \\[1, 2147483647\\]"),
    (["--data_type", "dummy", "--initial_ctx_len", "4096", "--ctx_len", "1024"], "--initial_ctx_len 4096"),
    (["--data_type", "dummy", "--epoch_begin", "5", "--epoch_count", "5"], "nothing left to train"),
    (["--data_type", "dummy", "--epoch_count", "0"], "--epoch_count 0 must be in \\[1, 1000000\\]"),
    (["--data_type", "dummy", "--lora"], "--lora trains adapters on a base model: pass the base with --load_model"),
    (["--data_type", "dummy", "--devices", "two"], "--devices"),
    (["--data_type", "uint16", "--data_file", "x.bin"], "--my_sample_len"),
])
def test_invalid_values(argv, message):
    with pytest.raises(UserInputError, match=message):
        parse_args(argv)


def test_readme_flag_table_lists_every_flag():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in flag_names() if f"| `--{name}` |" not in readme]
    assert not missing, f"README.md flag table lacks {missing}"


# Values the issue saw trained as nonsense, crash, or silently reinterpreted; each is refused before anything runs.
@pytest.mark.parametrize("argv, message", [
    (["--lr_init", "nan"], "--lr_init nan is not a finite number: it must be above 0."),
    (["--lr_init", "inf"], "--lr_init inf is not a finite number: it must be above 0."),
    (["--lr_final", "nan"], "--lr_final nan is not a finite number: it must be at least 0."),
    (["--adam_eps", "nan"], "--adam_eps nan is not a finite number: it must be above 0."),
    (["--adam_eps", "0"], "--adam_eps 0.0 must be above 0."),
    (["--beta2", "1"], r"--beta2 1.0 must be in \[0, 1\)."),
    (["--gradient_clip_val", "-1"], "--gradient_clip_val -1.0 must be at least 0."),
    (["--weight_decay", "-0.1"], "--weight_decay -0.1 must be at least 0."),
    (["--previous_step", "-3"], "--previous_step -3 must be at least 0."),
    (["--dim_att", "-8"], r"--dim_att -8 must be in \[0, 16777216\]."),
    (["--random_seed", "-5"], r"--random_seed -5 must be in \[0, 4294967295\], or -1."),
    (["--random_seed", "4294967296"], r"--random_seed 4294967296 must be in \[0, 4294967295\], or -1."),
    (["--max_epochs", "0"], r"--max_epochs 0 must be in \[1, 2147483647\]."),
    (["--max_steps", "0"], r"--max_steps 0 must be in \[1, 2147483647\], or -1."),
    (["--my_pile_stage", "5"], r"--my_pile_stage 5 must be in \[0, 4\]."),
    # sizes that built a model for ever (a billion layers), overflowed its matrices' sizes or an index
    (["--n_layer", "1000000000"], r"--n_layer 1000000000 must be in \[1, 10000\]."),
    (["--n_embd", "1000000000"], r"--n_embd 1000000000 must be in \[1, 16777216\]."),
    (["--epoch_count", str(10 ** 12)], r"--epoch_count 1000000000000 must be in \[1, 1000000\]."),
    (["--epoch_steps", str(10 ** 21)], r"--epoch_steps 1000000000000000000000 must be in \[1, 2147483647\]."),
    (["--accumulate_grad_batches", str(10 ** 21)], r"--accumulate_grad_batches 1000000000000000000000 must be in"),
    (["--instruct_data_ratio", "nan"], "--instruct_data_ratio nan is not a finite number"),
    (["--devices", "0"], "--devices must be a number of devices \\(at least 1\\)"),
    (["--tiny_att_dim", "8", "--tiny_att_layer", "6", "--n_layer", "6"],
     r"--tiny_att_layer 6 must name a block of the model \(0 to 5 with --n_layer 6\) to host --tiny_att_dim 8"),
    (["--tiny_att_dim", "8"], "--tiny_att_layer -999 must name a block of the model"),
    (["--my_pile_edecay", "3", "--epoch_count", "3"], "--my_pile_edecay 3 leaves none of the --epoch_count 3"),
])
def test_numbers_out_of_range_are_refused(argv, message, capsys):
    assert train.main(["--data_type", "dummy", *argv]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"train.py: error: {message}.*\n", err), err


def test_sentinels_and_bounds_are_accepted():
    cfg = parse_args(["--data_type", "dummy", "--random_seed", "-1", "--max_steps", "-1", "--my_pile_shift", "-1",
                      "--random_seed", "4294967295", "--beta1", "0", "--gradient_clip_val", "0", "--tiny_att_dim", "4",
                      "--tiny_att_layer", "5"])
    assert (cfg.random_seed, cfg.max_steps, cfg.gradient_clip_val, cfg.tiny_att_layer) == (4294967295, -1, 0.0, 5)


def test_every_numeric_flag_declares_its_range():
    """Flags with few values list them as choices; the --lora_* flags are checked by LoraSettings (with --lora);
    the internal experiments' flags are refused whenever set."""
    hints = typing.get_type_hints(TrainConfig)
    unchecked = [f.name for f in dataclasses.fields(TrainConfig)
                 if not f.metadata.get("derived") and f.metadata["group"] not in ("lora", "internal")
                 and _numeric(hints[f.name])
                 and f.metadata["valid"] is None and "choices" not in f.metadata]
    assert not unchecked, unchecked


def _numeric(hint) -> bool:
    types = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return types[0] in (int, float)
