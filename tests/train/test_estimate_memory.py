"""train.py --estimate_memory 1: the memory check's figures for the flags, printed without a GPU, a data file or a
--proj_dir; the last line is JSON."""
import json

import pytest
import torch

import train
from helpers import refused_in_one_line
from src.config import parse_args
from src.train import memory_check
from src.train.memory_check import GIB

SEVEN_B = ["--n_layer", "32", "--n_embd", "4096", "--vocab_size", "50277", "--ctx_len", "4096", "--grad_cp", "1",
           "--ctx_parts", "4", "--micro_bsz", "1", "--precision", "bf16"]


@pytest.fixture
def untouched(tmp_path, monkeypatch):
    """The estimate runs in an empty folder where any GPU query or data read fails the test."""
    from src.data import dataset

    def forbidden(*args, **kwargs):
        raise AssertionError("--estimate_memory touched the GPU or the data")

    for name in ("is_available", "device_count", "mem_get_info", "init"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(dataset, "load_token_data", forbidden)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def estimate(argv, capsys) -> tuple:
    """(the printed lines, the JSON of the last one) of train.main(argv), which exits 0."""
    capsys.readouterr()
    assert train.main(["--estimate_memory", "1", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.strip().splitlines()
    return lines, json.loads(lines[-1])


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2_offload", "auto"])
def test_the_7b_shape_gets_what_the_memory_check_computes(strategy, untouched, capsys):
    argv = [*SEVEN_B, "--strategy", strategy]
    lines, result = estimate(argv, capsys)
    need = memory_check.run_need(parse_args(["--estimate_memory", "1", *argv]), 50277, world_size=1,
                                 processes_per_host=1, on_gpu=True)
    params = 32 * (13 * 4096 ** 2 + 11 * 4096) + 2 * 50277 * 4096 + 4 * 4096
    assert result == {"strategy": strategy, "gpu_gib": round(need.gpu / GIB, 2),
                      "host_gib": round(need.host / GIB, 2), "params": params}
    assert f"GPU: {need.gpu / GIB:.1f} GiB per GPU" in lines[2] and f"host: {need.host / GIB:.1f} GiB" in lines[3]
    assert "1 GPU process per machine (--devices auto: 1), 1 machine" in lines[1]
    if strategy == "deepspeed_stage_2_offload":  # what a 128 GiB machine cannot hold
        assert result["host_gib"] == 142.7 and result["host_gib"] > 124 and result["gpu_gib"] < 24
    else:  # bf16 weights and gradients, fp32 masters and Adam on the card
        assert result["gpu_gib"] > 110 and result["host_gib"] == 5.0
    assert not any(untouched.iterdir())


def test_nothing_is_written_and_no_file_is_read(untouched, capsys):
    """A --proj_dir that does not exist stays absent (no lock, no log); a --data_file and a --load_model that do
    not exist are not needed."""
    proj_dir = untouched / "out"
    _, result = estimate([*SEVEN_B, "--strategy", "deepspeed_stage_2_offload", "--proj_dir", str(proj_dir),
                          "--data_type", "binidx", "--data_file", str(untouched / "missing"),
                          "--load_model", str(untouched / "RWKV-4-7B.pth")], capsys)
    assert result["host_gib"] == 142.7
    assert not proj_dir.exists() and not any(untouched.iterdir())


def test_lora_devices_and_cpu(untouched, capsys):
    lines, result = estimate([*SEVEN_B, "--strategy", "deepspeed_stage_2", "--lora", "--devices", "4",
                              "--num_nodes", "2", "--accelerator", "gpu"], capsys)
    cfg = parse_args(["--estimate_memory", "1", *SEVEN_B, "--strategy", "deepspeed_stage_2", "--lora"])
    need = memory_check.run_need(cfg, 50277, world_size=8, processes_per_host=4, on_gpu=True)
    assert result["gpu_gib"] == round(need.gpu / GIB, 2) and result["host_gib"] == round(need.host / GIB, 2)
    assert "4 GPU processes per machine, 2 machines" in lines[1] and "trainable with --lora" in lines[4]
    lines, result = estimate(["--vocab_size", "256", "--accelerator", "cpu"], capsys)
    assert result["gpu_gib"] == 0 and lines[2] == "GPU: none (--accelerator cpu)"
    assert not any(untouched.iterdir())


def test_without_vocab_size_it_is_refused_in_one_line(untouched, capsys):
    refused_in_one_line(["--estimate_memory", "1", "--n_layer", "32", "--n_embd", "4096"], capsys,
                        "--estimate_memory 1 needs --vocab_size")
    assert not any(untouched.iterdir())


def test_a_load_model_file_that_is_there_decides_the_family_and_widths(untouched, tmp_path_factory, capsys):
    """A released RWKV-7 file with its own low-rank widths, passed without --my_testing or width flags: the estimate
    is of the model training builds from it (the flags alone describe an RWKV-4). A file the flags do not describe
    is refused as training refuses it. A file not there yet leaves the family to the flags, and the lines say so."""
    from src.io.checkpoint import save_weights
    from src.models.rwkv7.config import RWKV7Config
    from src.models.rwkv7.family import RWKV7
    from src.models.rwkv7.model import generate_init_weights

    widths = dict(d_decay_lora=64, d_aaa_lora=48, d_mv_lora=40, d_gate_lora=96)  # the rule gives 32 at C = 32
    model = RWKV7.build(RWKV7Config(vocab_size=256, n_layer=2, n_embd=32, head_size=8, dim_ffn=96, **widths))
    release = tmp_path_factory.mktemp("downloads") / "release.pth"  # the folder the estimate runs in stays empty
    save_weights(generate_init_weights(model), release)
    flags = ["--n_layer", "2", "--n_embd", "32", "--vocab_size", "256", "--accelerator", "cpu"]

    lines, result = estimate([*flags, "--head_size", "8", "--load_model", str(release)], capsys)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert "RWKV-7 L2 D32 vocab 256" in lines[0]
    assert lines[-2].endswith(f"the keys and shapes of --load_model {release} were read")

    refused_in_one_line(["--estimate_memory", "1", *flags, "--head_size", "16", "--load_model", str(release)], capsys,
                        f"--load_model {release} does not fit the model built from the flags", "--head_size")

    lines, _ = estimate([*flags, "--load_model", str(release.with_name("not_yet.pth"))], capsys)
    assert "RWKV-4 L2 D32" in lines[0]
    assert lines[-2].endswith(f"--load_model {release.with_name('not_yet.pth')} is not there, so the flags decide "
                              f"the family: RWKV-4 (--my_testing x070 for RWKV-7)")
    assert not any(untouched.iterdir())
