"""--state_cp on a GPU under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-2 offload: it trains, and the gradients
DeepSpeed hands its optimizer equal those of plain backpropagation over the same samples.

Each run is its own train.py process (DeepSpeed initialises once per process). Run with
`python -m pytest -m gpu -s tests/test_gpu_infctx.py` on a CUDA machine with deepspeed installed.

Tolerance: bf16 weights and activations, the sample split differently (one pass of 1024 tokens vs four
of 256: other matmul shapes, other rounding). Per parameter tensor, ||g_segments - g_full|| / ||g_full||
<= 3e-2; over all parameters together <= 1e-2. A wrong gradient (a segment or a state gradient missing,
a sum counted twice) is off by O(1).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

PER_TENSOR_RTOL = 3e-2
OVERALL_RTOL = 1e-2
# L6 D512 on the built-in data, bf16, grad_cp; samples of 1024 tokens in 4 segments of 256 with --state_cp 1
RUN = ["--data_type", "dummy", "--n_layer", "6", "--n_embd", "512", "--ctx_len", "1024", "--ctx_parts", "4",
       "--micro_bsz", "2", "--epoch_steps", "12", "--epoch_count", "1", "--epoch_save", "0", "--lr_init", "1e-3",
       "--lr_final", "1e-3", "--precision", "bf16", "--grad_cp", "1", "--random_seed", "1",
       "--enable_progress_bar", "0", "--accelerator", "gpu", "--devices", "1"]


def train_and_save_first_gradients(proj_dir: Path, *argv) -> tuple:
    """train.py with `argv` (this module run as a script); returns (gradients of step 1, step losses)."""
    command = [sys.executable, "-m", "tests.test_gpu_infctx", *argv, "--proj_dir", str(proj_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]
    return torch.load(proj_dir / "first_gradients.pt"), [float(r.split("\t")[2]) for r in rows]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


@needs_deepspeed
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload"])
def test_state_cp_trains_and_matches_plain_gradients(tmp_path, strategy):
    full, _ = train_and_save_first_gradients(tmp_path / "full", *RUN, "--strategy", strategy)
    segments, losses = train_and_save_first_gradients(tmp_path / "segments", *RUN, "--strategy", strategy,
                                                      "--state_cp", "1")
    assert segments.keys() == full.keys()
    errors = {name: relative_error(segments[name], g) for name, g in full.items()}
    worst = max(errors, key=errors.get)
    overall = relative_error(torch.cat([segments[n].flatten() for n in full]),
                             torch.cat([g.flatten() for g in full.values()]))
    print(f"\n[state_cp] {strategy}: gradient error vs full backprop overall {overall:.2e}, worst {worst} "
          f"{errors[worst]:.2e}; loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    assert overall <= OVERALL_RTOL and errors[worst] <= PER_TENSOR_RTOL, (overall, worst, errors[worst])
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3


def main(argv) -> int:
    """Child process: train.py plus a callback that saves the first optimizer step's gradients."""
    import lightning.pytorch as pl

    import train
    from src.config import parse_args
    from src.trainer import is_deepspeed

    class SaveFirstGradients(pl.Callback):
        def __init__(self, path: Path):
            self.path = path

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step != 0:
                return
            if is_deepspeed(trainer.strategy):
                from deepspeed.utils import safe_get_full_grad as grad_of
            else:
                def grad_of(p):
                    return p.grad
            torch.save({n: grad_of(p).float().cpu() for n, p in pl_module.model.named_parameters()}, self.path)

    cfg = parse_args(argv)
    return train.train(cfg, [SaveFirstGradients(Path(cfg.proj_dir) / "first_gradients.pt")])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
