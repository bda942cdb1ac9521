"""--strategy offload on a GPU through train.py: 3 steps equal --strategy auto's (fp32 masters within 1e-6 relative,
bf16 weights within one unit in the last place), and Ctrl+C then --resume ends where a run that never stopped ends."""
import lightning.pytorch as pl
import pytest
import torch

import train
from helpers import stopped_by_one_sigint
from src.io.checkpoint import load_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RUN = ["--data_type", "utf-8", "--data_file", "text.txt", "--proj_dir", "out", "--n_layer", "2", "--n_embd", "64",
       "--ctx_len", "64", "--micro_bsz", "2", "--epoch_steps", "6", "--epoch_count", "1", "--epoch_save", "0",
       "--accumulate_grad_batches", "2", "--max_steps", "3", "--enable_progress_bar", "0", "--random_seed", "3",
       "--precision", "bf16", "--lr_init", "3e-3", "--lr_final", "1e-3", "--weight_decay", "0.01",
       "--gradient_clip_val", "0.5", "--accelerator", "gpu", "--devices", "1"]


class Masters(pl.Callback):
    """The optimizer's fp32 masters and the model's bf16 weights when training ends."""

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.masters = [m.detach().float().cpu().clone() for group in optimizer.masters for m in group]
        self.weights = [p.detach().cpu().clone() for group in optimizer.param_groups for p in group["params"]]


def run(strategy, folder, monkeypatch) -> Masters:
    folder.mkdir()
    (folder / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    monkeypatch.chdir(folder)
    masters = Masters()
    assert train.train(train.parse_args([*RUN, "--strategy", strategy]), [masters]) == 0
    return masters


def test_three_steps_equal_those_of_auto(tmp_path, monkeypatch):
    auto = run("auto", tmp_path / "auto", monkeypatch)
    offload = run("offload", tmp_path / "offload", monkeypatch)
    for ours, theirs in zip(offload.masters, auto.masters):
        assert (ours - theirs).norm() <= 1e-6 * theirs.norm()
    for ours, theirs in zip(offload.weights, auto.weights):
        assert ours.dtype == theirs.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * theirs.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        assert ((ours.float() - theirs.float()).abs() <= ulp).all()


def test_ctrl_c_then_resume_continues_bit_exactly(tmp_path, monkeypatch):
    long_run = [*RUN[:RUN.index("--max_steps")], *RUN[RUN.index("--max_steps") + 2:], "--strategy", "offload",
                "--epoch_steps", "200", "--epoch_count", "2"]
    for name in ("straight", "stopped"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    monkeypatch.chdir(tmp_path / "straight")
    assert train.main(long_run) == 0
    straight = load_weights(tmp_path / "straight" / "out" / "rwkv-final.pth")
    monkeypatch.chdir(tmp_path / "stopped")
    assert stopped_by_one_sigint(long_run, tmp_path / "stopped" / "out") == 130
    assert train.main([*long_run, "--resume", "out/rwkv-resume.ckpt"]) == 0
    resumed = load_weights(tmp_path / "stopped" / "out" / "rwkv-final.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
