"""Bad input through train.main, into a --proj_dir that holds a finished run: exit 2, one line naming the flag or
file and the way out, and every file of the folder byte-identical afterwards."""
import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_RUN
from helpers import folder_snapshot, refused_in_one_line


@pytest.fixture
def proj_dir(finished_copy):
    return finished_copy


def test_the_same_command_again_does_not_replace_the_finished_runs_files(proj_dir, capsys):
    before = folder_snapshot(proj_dir)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir)], capsys,
                        f"--proj_dir {proj_dir} already holds files this run would write: rwkv-init.pth, rwkv-0.pth, "
                        "rwkv-1.pth, rwkv-final.pth", "another --proj_dir", "--overwrite_proj_dir 1")
    assert folder_snapshot(proj_dir) == before


@pytest.mark.parametrize("extra, expected", [
    (["--dim_att", "8"], ["rwkv-init.pth", "--overwrite_proj_dir 1"]),  # another model shape, same folder
    (["--epoch_count", "0"], ["--epoch_count 0 must be at least 1"]),
    (["--lora"], ["--lora", "--load_model"]),  # adapters on a random base
    # LoRA into its base's folder, whose rwkv-final.pth it would replace
    (["--load_model", "{proj_dir}/rwkv-final.pth", "--lora"],
     ["this run's output {proj_dir}/rwkv-final.pth is --load_model {proj_dir}/rwkv-final.pth"]),
    # --overwrite_proj_dir 1: these refusals come before any file (rwkv-init.pth, vocab.json) is rewritten
    (["--load_model", "{proj_dir}/garbage.pth", "--overwrite_proj_dir", "1"],
     ["--load_model", "garbage.pth is not a PyTorch file", "expected a .pth of {name: tensor}"]),
    (["--resume", "{proj_dir}/rwkv-1.pth"], ["--resume", "rwkv-1.pth is not a resume bundle",
                                             "use --load_model"]),
    (["--data_type", "utf-8", "--data_file", "{proj_dir}/short.txt", "--overwrite_proj_dir", "1"],
     ["short.txt has 3 tokens", "--ctx_len 16"]),
    # numbers that trained nonsense or crashed after writing rwkv-init.pth
    (["--adam_eps", "nan", "--overwrite_proj_dir", "1"], ["--adam_eps nan is not a finite number: it must be above 0"]),
    (["--lr_final", "nan", "--overwrite_proj_dir", "1"], ["--lr_final nan is not a finite number"]),
    (["--max_epochs", "0", "--overwrite_proj_dir", "1"], ["--max_epochs 0 must be at least 1"]),
    (["--tiny_att_dim", "4", "--tiny_att_layer", "1", "--overwrite_proj_dir", "1"],
     ["--tiny_att_layer 1 must name a block of the model (0 to 0 with --n_layer 1)"]),
    # flags that were silently ignored or lied
    (["--load_model", "{proj_dir}/rwkv-1.pth", "--lora_load", "{proj_dir}/rwkv-0.pth", "--epoch_begin", "2",
      "--epoch_count", "3"], ["--lora_load", "only a --lora run trains"]),
    (["--vocab_size", "50277", "--overwrite_proj_dir", "1"],
     ["--vocab_size 50277: the characters of the built-in dummy data set the vocabulary of --data_type dummy "
      "(13 of them); leave --vocab_size out"]),
    (["--load_model", "{proj_dir}/adapter.pth", "--epoch_begin", "2", "--epoch_count", "3"],
     ["adapter.pth is a LoRA file (adapters only, no base model)", "--lora_load", "merge_lora.py"]),
    (["--data_type", "numpy", "--data_file", "{proj_dir}/tokens.npz", "--vocab_size", "20", "--overwrite_proj_dir",
      "1"], ["tokens.npz is an .npz archive of several arrays", "numpy.save"]),
    (["--data_type", "uint16", "--data_file", "{proj_dir}/short.txt", "--my_sample_len", "2", "--vocab_size", "200",
      "--overwrite_proj_dir", "1"], ["short.txt is 3 bytes, not a whole number of uint16 tokens"]),
    # a hand continuation on text of other characters would rewrite vocab.json under the earlier checkpoints
    (["--data_type", "utf-8", "--data_file", "{proj_dir}/letters.txt", "--load_model", "{proj_dir}/rwkv-1.pth",
      "--epoch_begin", "2", "--epoch_count", "4"],
     ["letters.txt has other characters than", "vocab.json, the vocabulary of the checkpoints in --proj_dir (13 "
      "characters vs 13; only in the data: 'a' 'b'", "only in vocab.json: '+' '.' '0'"]),
])
def test_bad_input_leaves_every_file_as_it_was(proj_dir, capsys, extra, expected):
    (proj_dir / "garbage.pth").write_bytes(os.urandom(3000))
    (proj_dir / "short.txt").write_text("xyz")  # characters other than the dummy data's: vocab.json must stay
    (proj_dir / "letters.txt").write_text("abcdefghijklm" * 4)  # as many characters as the dummy data's, others
    torch.save({"blocks.0.att.key.lora_A": torch.zeros(4, 16), "blocks.0.att.key.lora_B": torch.zeros(16, 4)},
               proj_dir / "adapter.pth")
    np.savez(proj_dir / "tokens.npz", tokens=np.arange(100, dtype=np.uint16) % 20)
    before = folder_snapshot(proj_dir)
    argv = [*TINY_RUN, "--proj_dir", str(proj_dir), *[arg.format(proj_dir=proj_dir) for arg in extra]]
    err = refused_in_one_line(argv, capsys, *[text.replace("{proj_dir}", str(proj_dir)) for text in expected])
    assert "weights_only" not in err  # never torch's advice to load an unknown file unsafely
    assert folder_snapshot(proj_dir) == before


def test_a_file_of_python_objects_is_named_as_such(proj_dir, capsys):
    torch.save({"emb.weight": torch.zeros(2), "hparams": argparse.Namespace(lr=1e-3)}, proj_dir / "objects.pth")
    before = folder_snapshot(proj_dir)
    err = refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), "--load_model", str(proj_dir / "objects.pth"),
                   "--overwrite_proj_dir", "1"], capsys, "objects.pth holds Python objects besides tensors")
    assert "weights_only" not in err and folder_snapshot(proj_dir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_accelerator_gpu_without_a_gpu(proj_dir, capsys):
    before = folder_snapshot(proj_dir)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir / "gpu"), "--accelerator", "gpu"], capsys,
            "--accelerator gpu: torch sees no CUDA GPU", "--accelerator cpu")
    assert folder_snapshot(proj_dir) == before


def test_a_proj_dir_under_a_file(proj_dir, capsys):
    before = folder_snapshot(proj_dir)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir / "rwkv-0.pth" / "run2")], capsys,
            f"{proj_dir / 'rwkv-0.pth'} is a file, not a folder")
    assert folder_snapshot(proj_dir) == before


@pytest.mark.parametrize("folder", ["/proc", "/sys"])  # no one, root included, creates files there
def test_a_proj_dir_where_no_file_can_be_created(folder, capsys):
    refused_in_one_line([*TINY_RUN, "--proj_dir", f"{folder}/rwkv-infctx-test"], capsys,
            f"--proj_dir {folder}/rwkv-infctx-test: cannot create files in {folder} (")
    assert not Path(folder, "rwkv-infctx-test").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_proj_dir(proj_dir, capsys):
    before = folder_snapshot(proj_dir)
    proj_dir.chmod(0o555)
    try:
        refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), "--overwrite_proj_dir", "1"], capsys,
                f"--proj_dir {proj_dir}: cannot create files in {proj_dir}")
    finally:
        proj_dir.chmod(0o755)
    assert folder_snapshot(proj_dir) == before


def test_a_resume_bundle_given_to_load_model(proj_dir, capsys):
    bundle = {"state_dict": {"model.emb.weight": torch.zeros(2)}, "loops": {}, "callbacks": {}}
    torch.save(bundle, proj_dir / "rwkv-resume.ckpt")
    before = folder_snapshot(proj_dir)
    bundle = proj_dir / "rwkv-resume.ckpt"
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir / "next"), "--load_model", str(bundle)], capsys,
                        "is a resume bundle, not weights", f"--resume {bundle}")
    assert folder_snapshot(proj_dir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("extra, expected", [
    (["--precision", "fp16"],
     "--precision fp16 needs a CUDA GPU, and this run trains on the CPU (where Lightning would train bf16 instead); "
     "use --precision bf16 or fp32"),
    (["--wkv_backend", "cuda"], "--wkv_backend cuda runs the WKV kernel on a CUDA GPU, and this run trains on the CPU; "
                                "use --wkv_backend torch"),
])
def test_gpu_only_flags_on_a_cpu(proj_dir, capsys, extra, expected):
    before = folder_snapshot(proj_dir)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), "--overwrite_proj_dir", "1", *extra], capsys,
                        expected)
    assert folder_snapshot(proj_dir) == before


def test_compile_on_a_gpu_without_triton(monkeypatch):
    """--compile 1 needs Triton where it trains on a GPU; refused before anything runs, with both ways out."""
    import importlib.util

    from src.train import strategy
    from src.config import parse_args
    from src.errors import UserInputError

    cfg = parse_args(TINY_RUN)
    monkeypatch.setattr(strategy, "training_device", lambda cfg: "cuda:0")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(UserInputError, match=r"--compile 1 .* Triton, which is not installed here; pip install "
                                             r"triton, or pass --compile 0"):
        strategy.check_fused_kernels(cfg)
    strategy.check_fused_kernels(parse_args([*TINY_RUN, "--compile", "0"]))


@pytest.mark.parametrize("damage, expected", [
    ("appended", "d.bin is 28 bytes but {prefix}.idx describes only 20: the .bin was appended to or belongs to "
                 "another index"),
    ("float32", "d.idx says its tokens are float32 (dtype code 6); token ids are integers"),
])
def test_binidx_data_that_does_not_describe_integer_tokens(proj_dir, capsys, damage, expected):
    from src.data.binidx import MMapIndexedDatasetBuilder
    prefix = proj_dir / "d"
    builder = MMapIndexedDatasetBuilder(prefix, np.float32 if damage == "float32" else np.uint16)
    builder.add_documents(np.arange(10) % 5, [4, 6])
    builder.finalize()
    if damage == "appended":
        with open(f"{prefix}.bin", "ab") as f:
            f.write(np.full(4, 7, np.uint16).tobytes())
    before = folder_snapshot(proj_dir)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), "--overwrite_proj_dir", "1", "--data_type", "binidx",
                         "--data_file", str(prefix), "--vocab_size", "10", "--ctx_len", "4"], capsys,
                        expected.format(prefix=prefix))
    assert folder_snapshot(proj_dir) == before


@pytest.mark.parametrize("name", ["rwkv-0.pth", "train_log.txt", "train_steps.tsv", "vocab.json"])
def test_a_folder_where_the_run_writes_a_file(tmp_path, capsys, name):
    proj_dir = tmp_path / "out"
    (proj_dir / name).mkdir(parents=True)
    refused_in_one_line([*TINY_RUN, "--proj_dir", str(proj_dir), "--overwrite_proj_dir", "1"], capsys,
                        f"--proj_dir {proj_dir} holds folders named as files this run writes: {name}; move them away")
    assert [p.name for p in proj_dir.iterdir()] == [name]
