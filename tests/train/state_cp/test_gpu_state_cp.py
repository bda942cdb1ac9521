"""--state_cp on a GPU under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-2 offload: it trains, and the gradients
DeepSpeed hands its optimizer are those of plain backpropagation over the same samples.

Each run is its own train.py process (DeepSpeed initialises once per process); a callback saves the first
optimizer step's gradients as DeepSpeed assembled them. Run with
`python -m pytest -m gpu -s tests/train/state_cp/test_gpu_state_cp.py` on a CUDA machine with deepspeed installed.

Tolerances. In fp32 (no TF32) the segmented gradients equal plain backpropagation's within 1e-4 relative
(||a - b|| / ||b|| per parameter tensor; the splits change matmul shapes, so rounding differs). In bf16 the
oracle is still the fp32 plain run: bf16 plain backpropagation is itself some distance e from it, and the
segmented bf16 gradients must be no further than 1.5 e overall and 2 e + 1e-3 for every tensor, i.e. state
checkpointing adds no error beyond bf16's own. A wrong gradient (a segment or a state gradient missing, a
sum counted twice) is off by O(1).

RWKV-7 (--my_testing x070, L4 D256, head size 64) runs under ZeRO-2 with the same samples, segments and tolerances,
from a base whose every tensor is BlinkDL's initialisation plus noise: his zero att.output, ffn.value and low-rank
w1/a1/v1/g1 would zero the first step's gradient of everything behind them (the time-mix, and with it the WKV-7
state's gradient from one segment to the one before), which the comparison is there to check.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]  # also run as a child process (python -m tests....), without conftest
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

FP32_RTOL = 1e-4
# the built-in data, grad_cp; samples of 1024 tokens, in 4 segments of 256 with --state_cp 1
SAMPLES = ["--data_type", "dummy", "--ctx_len", "1024", "--ctx_parts", "4", "--micro_bsz", "2", "--epoch_steps", "12",
           "--epoch_count", "1", "--epoch_save", "0", "--lr_init", "1e-3", "--lr_final", "1e-3", "--grad_cp", "1",
           "--random_seed", "1", "--enable_progress_bar", "0", "--accelerator", "gpu", "--devices", "1"]
RUN = ["--n_layer", "6", "--n_embd", "512", *SAMPLES]  # RWKV-4 L6 D512
RWKV7_SHAPE = dict(n_layer=4, n_embd=256, head_size=64, vocab_size=13)  # the built-in data has 13 characters
RWKV7_RUN = ["--my_testing", "x070", "--n_layer", "4", "--n_embd", "256", "--head_size", "64", *SAMPLES]


def train_and_save_first_gradients(proj_dir: Path, *argv, run: list = RUN) -> tuple:
    """train.py with `run` and `argv` (this module run as a script); returns (gradients of step 1, step losses)."""
    command = [sys.executable, "-m", "tests.train.state_cp.test_gpu_state_cp", *run, *argv, "--proj_dir",
               str(proj_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]
    return torch.load(proj_dir / "first_gradients.pt"), [float(r.split("\t")[2]) for r in rows]


def relative_errors(got: dict, expected: dict) -> tuple:
    """(overall, {name: per tensor}) of ||got - expected|| / ||expected||."""
    def error(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
    assert got.keys() == expected.keys()
    overall = error(torch.cat([got[n].flatten() for n in expected]),
                    torch.cat([g.flatten() for g in expected.values()]))
    return overall, {name: error(got[name], g) for name, g in expected.items()}


def assert_fp32_equals_plain(label: str, got: dict, plain_fp32: dict) -> None:
    overall, errors = relative_errors(got, plain_fp32)
    worst = max(errors, key=errors.get)
    print(f"\n[state_cp] {label}: gradient error vs plain {overall:.1e}, worst {worst} {errors[worst]:.1e}")
    assert errors[worst] <= FP32_RTOL


def assert_no_error_beyond_bf16s_own(label: str, got: dict, losses: list, plain: dict) -> None:
    """`got`, bf16 segmented, against the fp32 plain oracle, within bounds set by bf16 plain's own error; and the
    12 steps train."""
    overall, errors = relative_errors(got, plain["fp32"])
    bf16_overall, bf16_errors = relative_errors(plain["bf16"], plain["fp32"])
    worst = max(errors, key=lambda n: errors[n] / (bf16_errors[n] + 1e-3))
    print(f"\n[state_cp] {label}: gradient error vs fp32 plain {overall:.2e} (bf16 plain: "
          f"{bf16_overall:.2e}); worst {worst} {errors[worst]:.2e} ({bf16_errors[worst]:.2e}); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    assert overall <= 1.5 * bf16_overall
    assert all(errors[n] <= 2 * bf16_errors[n] + 1e-3 for n in errors), worst
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3


def plain_gradients(folder: Path, *argv, run: list = RUN) -> dict:
    """Plain backpropagation's first gradients under ZeRO-2 in fp32 (the oracle) and in bf16 (bf16's own error)."""
    return {precision: train_and_save_first_gradients(folder / precision, *argv, "--precision", precision,
                                                      "--strategy", "deepspeed_stage_2", run=run)[0]
            for precision in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return plain_gradients(tmp_path_factory.mktemp("plain"))


@needs_deepspeed
@pytest.mark.gpu
def test_state_cp_fp32_gradients_equal_plain_backpropagation(plain, tmp_path):
    got, _ = train_and_save_first_gradients(tmp_path, "--precision", "fp32", "--strategy", "deepspeed_stage_2",
                                            "--state_cp", "1")
    assert_fp32_equals_plain("fp32 deepspeed_stage_2", got, plain["fp32"])


@needs_deepspeed
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload"])
def test_state_cp_bf16_trains_with_no_error_beyond_bf16s_own(plain, tmp_path, strategy):
    got, losses = train_and_save_first_gradients(tmp_path, "--precision", "bf16", "--strategy", strategy,
                                                 "--state_cp", "1")
    assert_no_error_beyond_bf16s_own(f"bf16 {strategy}", got, losses, plain)


def noisy_rwkv7_base(path: Path) -> Path:
    """An RWKV-7 base of RWKV7_SHAPE: BlinkDL's initialisation plus N(0, 0.02^2) on every tensor, saved as fp32."""
    from src.io.checkpoint import save_weights
    from src.models.rwkv7.config import RWKV7Config
    from src.models.rwkv7.family import RWKV7

    torch.manual_seed(0)
    weights = RWKV7.init_weights(RWKV7.build(RWKV7Config(**RWKV7_SHAPE)), 1e-3)
    save_weights({name: w + 0.02 * torch.randn_like(w) for name, w in weights.items()}, path)
    return path


@pytest.fixture(scope="module")
def rwkv7_plain(tmp_path_factory):
    """(the noisy base's flag, plain backpropagation's first gradients in fp32 and bf16) for RWKV-7."""
    folder = tmp_path_factory.mktemp("rwkv7_plain")
    base = ["--load_model", str(noisy_rwkv7_base(folder / "base.pth"))]
    return base, plain_gradients(folder, *base, run=RWKV7_RUN)


@needs_deepspeed
@pytest.mark.gpu
def test_rwkv7_state_cp_fp32_gradients_equal_plain_backpropagation(rwkv7_plain, tmp_path):
    base, plain = rwkv7_plain
    assert all(g.norm() > 0 for g in plain["fp32"].values())  # every tensor's gradient checked, none zero by init
    got, _ = train_and_save_first_gradients(tmp_path, *base, "--precision", "fp32", "--strategy",
                                            "deepspeed_stage_2", "--state_cp", "1", run=RWKV7_RUN)
    assert_fp32_equals_plain("RWKV-7 fp32 deepspeed_stage_2", got, plain["fp32"])


@needs_deepspeed
@pytest.mark.gpu
def test_rwkv7_state_cp_bf16_trains_with_no_error_beyond_bf16s_own(rwkv7_plain, tmp_path):
    base, plain = rwkv7_plain
    got, losses = train_and_save_first_gradients(tmp_path, *base, "--precision", "bf16", "--strategy",
                                                 "deepspeed_stage_2", "--state_cp", "1", run=RWKV7_RUN)
    assert_no_error_beyond_bf16s_own("RWKV-7 bf16 deepspeed_stage_2", got, losses, plain)


def main(argv) -> int:
    """Child process: train.py plus a callback that saves the first optimizer step's gradients."""
    import lightning.pytorch as pl

    import train
    from src.config import parse_args
    from src.train.strategy import is_deepspeed

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
