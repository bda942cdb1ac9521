"""Inputs, runs and comparisons shared by the tests of the WKV-7 kernel: on the GPU (test_wkv7_cuda.py) and its source
compiled for the CPU (test_wkv7_kernel_on_cpu.py).

Errors are relative RMS, ||got - want|| / ||want||, printed before any assertion. The reference is the twin in fp64.
- fp32 inputs: the kernel against the fp64 twin on the same inputs. The kernel's gradients of r, w and a read states
  recovered by inverse steps (up to 8 in a row, each multiplying rounding errors by up to 1.83): ~5e-7 with decays
  spread over their range and ~2e-6 with every decay at the floor, the worst case, in the PyTorch model of the
  algorithm (tests/models/rwkv7/test_wkv7_backward_model.py) and the kernel source built for the CPU; ~3e-7 for the
  rest, as the fp32 twin's own. FP32_TOL is 2e-5, 10x the worst measured.
- bf16 inputs: y and the six input gradients are rounded to bf16 (about 1.7e-3 relative RMS), which dominates. Both
  the kernel and the bf16 twin (which computes in fp32 and rounds the same outputs) are compared with the fp64 twin on
  the same bf16-rounded inputs, and the kernel's error must be at most twice the twin's plus BF16_SLACK (the fp32
  part, which bf16 rounding does not cover where it is exact: sT and the gradient of s0 are fp32 outputs).
"""
import torch

from src.models.rwkv7.wkv import wkv7_torch

INPUTS = ("r", "w", "k", "v", "a", "b")
NAMES = ("y", "sT", *INPUTS, "s0")  # outputs, then the gradient of each input
FP32_TOL = 2e-5
BF16_SLACK = 5e-5


def make_inputs(B: int, T: int, H: int, N: int = 64, device="cpu", seed: int = 0, w_shift: float = 0.0) -> dict:
    """Random fp32 inputs as the model makes them (a = -kk, b = kk * rate with kk of unit norm; w the raw decay,
    2 N(0, 1) + w_shift), a carried s0 (the twin's state after 20 random tokens) and the gradients dy, dsT."""
    gen = torch.Generator().manual_seed(seed)

    def heads(tokens):
        r, w, k, v = (torch.randn(B, tokens, H, N, generator=gen) for _ in range(4))
        kk = torch.nn.functional.normalize(torch.randn(B, tokens, H, N, generator=gen), dim=-1)
        rate = torch.rand(B, tokens, H, N, generator=gen)
        return dict(r=r, w=2 * w + w_shift, k=k, v=v, a=-kk, b=kk * rate)

    prefix = heads(20)
    inp = heads(T)
    inp["s0"] = wkv7_torch(*(prefix[n].double() for n in INPUTS))[1].float()
    inp["dy"] = torch.randn(B, T, H, N, generator=gen)
    inp["dsT"] = torch.randn(B, H, N, N, generator=gen)
    return {name: t.to(device) for name, t in inp.items()}


def rounded_to(inp: dict, dtype) -> dict:
    """The per-token inputs and dy rounded to dtype (and back to fp32); s0 and dsT are fp32 in the contract."""
    return {name: t.to(dtype).float() if t.shape == inp["r"].shape else t for name, t in inp.items()}


def run(op, inp: dict, dtype, split=()) -> dict:
    """y, sT and the gradients of <y, dy> + <sT, dsT> through `op` with the six inputs in `dtype` (s0 in fp32, or fp64
    with fp64 inputs). split: token indices at which the call is cut, the state passed on."""
    leaves = {n: inp[n].to(dtype).clone().requires_grad_() for n in INPUTS}
    s0 = inp["s0"].to(torch.float64 if dtype == torch.float64 else torch.float32).clone().requires_grad_()
    bounds = [0, *split, inp["r"].shape[1]]
    ys, state = [], s0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        y, state = op(*(leaves[n][:, lo:hi] for n in INPUTS), state)
        ys.append(y)
    y = torch.cat(ys, 1)
    torch.autograd.backward([y, state], [inp["dy"].to(y.dtype), inp["dsT"].to(state.dtype)])
    return {"y": y.detach(), "sT": state.detach(), **{n: leaves[n].grad for n in INPUTS}, "s0": s0.grad}


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.double() - want.double()).norm()
    return (diff / want.double().norm().clamp_min(1e-30)).item()


def errors(got: dict, want: dict) -> dict:
    return {name: rel_rms(got[name], want[name]) for name in NAMES}


def check_finite(got: dict, label: str) -> None:
    for name in NAMES:
        assert torch.isfinite(got[name]).all(), f"{label}: {name} has NaN/Inf"


def check_fp32(op, inp: dict, label: str) -> None:
    """op with fp32 inputs against the fp64 twin: dtypes, finiteness, relative RMS error of every output."""
    got = run(op, inp, torch.float32)
    want = run(wkv7_torch, inp, torch.float64)
    err = errors(got, want)
    print(f"{label} fp32: " + ", ".join(f"{n} {e:.1e}" for n, e in err.items()))
    assert all(got[n].dtype == torch.float32 for n in NAMES)
    check_finite(got, label)
    assert all(e <= FP32_TOL for e in err.values()), f"{label}: errors above {FP32_TOL:.0e}: {err}"


def check_bf16(op, inp: dict, label: str) -> None:
    """op with bf16 inputs: no further from the fp64 twin (same bf16-rounded inputs) than twice the bf16 twin."""
    got = run(op, inp, torch.bfloat16)
    twin = run(wkv7_torch, inp, torch.bfloat16)
    want = run(wkv7_torch, rounded_to(inp, torch.bfloat16), torch.float64)
    err, twin_err = errors(got, want), errors(twin, want)
    print(f"{label} bf16: " + ", ".join(f"{n} {err[n]:.1e} (twin {twin_err[n]:.1e})" for n in NAMES))
    assert all(got[n].dtype == torch.bfloat16 for n in ("y", *INPUTS))
    assert got["sT"].dtype == got["s0"].dtype == torch.float32
    check_finite(got, label)
    worse = {n: err[n] for n in NAMES if err[n] > 2 * twin_err[n] + BF16_SLACK}
    assert not worse, f"{label}: kernel errors above 2x the bf16 twin's + {BF16_SLACK:.0e}: {worse}"
