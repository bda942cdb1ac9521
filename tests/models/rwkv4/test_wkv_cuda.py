"""The CUDA WKV kernel against its twin `wkv_torch`: outputs and every gradient, state included.

GPU tests are marked `gpu` (run with `python -m pytest -m gpu` on a CUDA machine). The build-failure
tests at the end run everywhere.

Inputs are drawn in fp32 with values exact in bf16 and fp16, so one fp32 reference run serves all three
kernel dtypes: the kernel computes in fp32 from the same numbers, and only its rounding of y, gk, gv to
the I/O dtype differs. Errors are relative RMS, ||got - want|| / ||want||, printed before asserting.
"""
import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from src import cuda_extension
from src.models.rwkv4 import wkv_cuda
from src.models.rwkv4.wkv import wkv, wkv_torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# y, gk, gv are rounded to the I/O dtype, by at most its unit roundoff per element: 2^-8 = 3.9e-3 relative
# for bf16 and 2^-11 = 4.9e-4 for fp16, so the relative RMS error is at most that plus the fp32 part (about
# 1.6e-3 and 2.1e-4 are typical). fp32: the kernel and the reference round differently (sums over rows and tiles,
# fused multiply-adds): about 1e-6 in the PyTorch model of the kernel (tests/models/rwkv4/test_wkv_chunked.py, up to
# T = 20000); the limit is 20x that.
IO_TOL = {torch.float32: 2e-5, torch.float16: 6e-4, torch.bfloat16: 5e-3}
# state_out, gw, gu and the state gradient are fp32 for every I/O dtype, computed from identical inputs.
FP32_TOL = 2e-5
IO_OUTPUTS = {"y", "gk", "gv"}
NAMES = ("y", "state_out", "gw", "gu", "gk", "gv", "gstate")

from conftest import ROOT
DEVICE = "cuda"
gpu = pytest.mark.gpu


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.double() - want.double()).pow(2).mean().sqrt()
    return (diff / want.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(results: dict, want: dict, tolerances: dict, label: str) -> None:
    """Print every error first, then check finiteness and tolerances."""
    errors = {name: rel_rms(results[name], want[name]) for name in want if want[name] is not None}
    print(f"{label}: " + ", ".join(f"{name} {err:.1e}" for name, err in errors.items()))
    for name, err in errors.items():
        assert torch.isfinite(results[name]).all(), f"{label}: {name} has NaN/Inf"
        assert err <= tolerances[name], f"{label}: {name} relative RMS error {err:.2e} > {tolerances[name]:.0e}"


def tolerances(dtype) -> dict:
    return {name: IO_TOL[dtype] if name in IO_OUTPUTS else FP32_TOL for name in NAMES}


def exact_in_half(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 values (exact in bf16, in fp16 for these magnitudes, and in fp32)."""
    return x.to(torch.bfloat16).float()


def make_inputs(B, T, C, with_state=True, k_range=None, wu_range=None):
    """Fresh random inputs on the GPU. The state is a real one (after a random prefix) or None; gab holds
    dL/daa and dL/dbb of the output state."""
    dev = DEVICE
    if wu_range is None:
        w, u = torch.randn(C, device=dev), torch.randn(C, device=dev)
    else:
        w, u = ((torch.rand(C, device=dev) * 2 - 1) * wu_range for _ in range(2))
    if k_range is None:
        k = exact_in_half(torch.randn(B, T, C, device=dev))
        prefix_k = torch.randn(B, 5, C, device=dev)
    else:
        k = exact_in_half((torch.rand(B, T, C, device=dev) * 2 - 1) * k_range)
        prefix_k = (torch.rand(B, 5, C, device=dev) * 2 - 1) * k_range
    v = exact_in_half(torch.randn(B, T, C, device=dev))
    state = wkv_torch(w, u, prefix_k, torch.randn(B, 5, C, device=dev))[1] if with_state else None
    gy = exact_in_half(torch.randn(B, T, C, device=dev))
    gab = torch.randn(B, C, 2, device=dev)
    return dict(w=w, u=u, k=k, v=v, state=state, gy=gy, gab=gab)


def _poison_allocator(k: torch.Tensor, io_dtype) -> None:
    """Leave NaN-filled free blocks of the outputs' sizes in the caching allocator, which hands them to the
    kernel's outputs: an element the kernel never writes then shows up as NaN."""
    B, T, C = k.shape
    blocks = [torch.full((B, T, C), float("nan"), dtype=io_dtype, device=k.device) for _ in range(3)]  # y, gk, gv
    blocks += [torch.full((B, C, 3), float("nan"), device=k.device) for _ in range(2)]  # state_out, gstate
    blocks += [torch.full((C,), float("nan"), device=k.device) for _ in range(2)]  # gw, gu
    del blocks


def run(op, inp, dtype=None, split=None):
    """y, state_out and all gradients of sum(y * gy) + <state_out, (gab, gP)> through `op`.

    dtype: cast k, v, gy to it (None keeps the inputs' dtype). split: token indices at which the call is cut into
    several calls with the state passed on. gP is NaN for the kernel (which must ignore it) and, for the
    reference, the value that makes the loss depend on the output state only through a and b.
    """
    io = dtype or inp["k"].dtype
    leaves = {n: inp[n].detach().clone().requires_grad_() for n in ("w", "u")}
    leaves["k"] = inp["k"].detach().to(io, copy=True).requires_grad_()
    leaves["v"] = inp["v"].detach().to(io, copy=True).requires_grad_()
    leaves["state"] = None if inp["state"] is None else inp["state"].detach().clone().requires_grad_()
    if op is not wkv_torch:
        _poison_allocator(leaves["k"], io)
    bounds = [0, *(split or []), leaves["k"].shape[1]]
    ys, state = [], leaves["state"]
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = op(leaves["w"], leaves["u"], leaves["k"][:, a:b], leaves["v"][:, a:b], state)
        ys.append(y)
    y = torch.cat(ys, 1)
    if op is wkv_torch:
        s = state.detach()
        gstate = torch.cat([inp["gab"], (inp["gab"] * s[..., :2]).sum(-1, keepdim=True)], -1)
    else:
        gstate = torch.cat([inp["gab"], torch.full_like(inp["gab"][..., :1], float("nan"))], -1)
    torch.autograd.backward([y, state], [inp["gy"].to(io), gstate])
    out = dict(y=y.detach(), state_out=state.detach())
    for name, key in (("gw", "w"), ("gu", "u"), ("gk", "k"), ("gv", "v"), ("gstate", "state")):
        out[name] = None if leaves[key] is None else leaves[key].grad
    return out


def kernel():
    return wkv_cuda.op()


def check_all_dtypes(inp, label):
    want = run(wkv_torch, inp)
    for dtype in DTYPES:
        got = run(kernel(), inp, dtype)
        assert got["y"].dtype == got["gk"].dtype == got["gv"].dtype == dtype
        assert got["state_out"].dtype == torch.float32
        assert_close(got, want, tolerances(dtype), f"{label} {dtype}")


SHAPES = [(B, T, C) for T in (1, 15, 64, 1000) for C in (32, 37, 96, 768, 4096) for B in (1, 3)]


@gpu
@pytest.mark.parametrize("B,T,C", SHAPES, ids=[f"B{B}-T{T}-C{C}" for B, T, C in SHAPES])
def test_kernel_matches_reference(B, T, C):
    check_all_dtypes(make_inputs(B, T, C), f"B{B} T{T} C{C}")


@gpu
@pytest.mark.parametrize("B,T,C", [(3, 15, 96), (1, 1000, 37), (3, 4096, 37)])
def test_kernel_matches_reference_from_empty_state(B, T, C):
    inp = make_inputs(B, T, C, with_state=False)
    check_all_dtypes(inp, f"empty state B{B} T{T} C{C}")


@gpu
@pytest.mark.parametrize("B,T,C", [(1, 4096, 4096), (3, 4096, 37), (1, 20000, 768)])
def test_kernel_matches_reference_long(B, T, C):
    """Long sequences: one reference run per shape, all three dtypes against it."""
    check_all_dtypes(make_inputs(B, T, C), f"long B{B} T{T} C{C}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_values_stay_finite_and_accurate(dtype):
    """k ~ U(-40, 40), time_decay and time_first ~ U(-10, 10): raw exponentials would overflow fp32 by far.
    Compared with a float64 reference, because here the fp32 reference itself is off by up to ~1e-4
    (measured on CPU) while the kernel, which chains fewer roundings, stays near 1e-5."""
    inp = make_inputs(3, 1000, 96, k_range=40.0, wu_range=10.0)
    want = run(wkv_torch, {n: (x.double() if x is not None else None) for n, x in inp.items()})
    got = run(kernel(), inp, dtype)
    tol = {name: 1e-4 for name in NAMES}
    if dtype == torch.bfloat16:
        tol.update({name: IO_TOL[dtype] for name in IO_OUTPUTS})
    assert_close(got, want, tol, f"large values {dtype}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_chaining_is_exact(dtype):
    """One call == the same tokens cut at arbitrary points with the state passed on: outputs and all
    gradients, including the input state's (which flow back through every later call)."""
    inp = make_inputs(2, 1000, 96)
    whole = run(kernel(), inp, dtype)
    pieces = run(kernel(), inp, dtype, split=[1, 17, 18, 300, 555, 999])
    assert_close(pieces, whole, tolerances(dtype), f"split vs whole {dtype}")
    reference = run(wkv_torch, inp, split=[1, 17, 18, 300, 555, 999])
    assert_close(pieces, reference, tolerances(dtype), f"split kernel vs split reference {dtype}")


@gpu
def test_ctx_parts_changes_nothing():
    """wkv(..., part_len=n) (--ctx_parts) runs several kernel calls; the results are those of one call."""
    inp = make_inputs(3, 777, 64)
    whole = run(kernel(), inp)

    def in_parts(w, u, k, v, state):
        return wkv(w, u, k, v, state, backend="cuda", part_len=100)

    assert_close(run(in_parts, inp), whole, tolerances(torch.float32), "ctx_parts")


@gpu
def test_gradients_are_deterministic():
    inp = make_inputs(2, 3000, 96)
    first, second = run(kernel(), inp, torch.bfloat16), run(kernel(), inp, torch.bfloat16)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name


def _model_loss(model, idx):
    logits, _ = model(idx[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


@gpu
def test_model_cuda_backend_matches_torch_backend():
    """The whole model: same loss and parameter gradients with either backend (fp32). WKV's ~1e-6
    differences pass through layer norms and two layers: 1e-4."""
    ref = tiny_model(vocab_size=37, n_layer=2, n_embd=64).to(DEVICE)
    fast = copy.deepcopy(ref)
    fast.options.wkv_backend = "cuda"
    idx = torch.randint(0, 37, (3, 129), device=DEVICE)
    losses = []
    for model in (ref, fast):
        loss = _model_loss(model, idx)
        loss.backward()
        losses.append(loss.item())
    print("losses", losses)
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        err = rel_rms(p_fast.grad, p_ref.grad)
        assert err <= 1e-4, f"{name}: gradient relative RMS error {err:.2e}"


@gpu
def test_bf16_training_run():
    """Ten AdamW steps with bf16 autocast (the kernel's bf16 path): finite and learning."""
    model = tiny_model(vocab_size=37, n_layer=2, n_embd=64).to(DEVICE)
    model.options.wkv_backend = "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = (torch.arange(257, device=DEVICE) * 7 % 37).repeat(4, 1)  # a learnable periodic sequence
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _model_loss(model, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("bf16 losses", [f"{x:.3f}" for x in losses])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


# Bad inputs reaching the binding directly (src.models.rwkv4.wkv checks shapes before it); one message line each.
_BAD_INPUTS = """
import torch
from src.models.rwkv4 import wkv_cuda
ext = wkv_cuda.EXTENSION.module()
w = torch.randn(8, device="cuda")
k = torch.randn(2, 5, 8, device="cuda")
state = torch.zeros(2, 8, 3, device="cuda")
for args in [(w, w, k, k, state.double()), (w, w, k, k[:, :4].contiguous(), state),
             (w, w, k.transpose(0, 1).contiguous().transpose(0, 1), k, state), (w, w, k.double(), k.double(), state),
             (w, w.cpu(), k, k, state)]:
    try:
        ext.forward(*args)
        print("accepted")
    except RuntimeError as exc:
        print(str(exc).splitlines()[0])
"""


@gpu
def test_binding_rejects_bad_inputs():
    """Run in a child process, so that a crash fails this test instead of ending the test session."""
    done = subprocess.run([sys.executable, "-c", _BAD_INPUTS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0
    expected = ["state must be Float", "v must have shape [2, 5, 8], got [2, 4, 8]", "k must be contiguous",
                "k must be float32, float16 or bfloat16, got Double", "u must be a CUDA tensor"]
    lines = done.stdout.splitlines()
    assert len(lines) == len(expected) and all(e in line for e, line in zip(expected, lines)), lines


# Build failure handling: no GPU needed (the build is replaced by one that fails).

@pytest.fixture
def failing_build(monkeypatch):
    def fail():
        raise RuntimeError("Error building extension 'wkv': ...\n"
                           "wkv_cuda.cu(12): error: identifier \"x\" is undefined\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(wkv_cuda.EXTENSION, "build", fail)
    monkeypatch.setattr(wkv_cuda.EXTENSION, "_loaded", None)
    cuda_extension._warn_fallback.cache_clear()
    yield
    cuda_extension._warn_fallback.cache_clear()


def test_failed_build_falls_back_with_one_warning(failing_build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert wkv_cuda.op(fallback=wkv_torch) is wkv_torch
        assert wkv_cuda.op(fallback=wkv_torch) is wkv_torch
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert 'identifier "x" is undefined' in messages[0] and "torch reference" in messages[0]


def test_failed_build_raises_without_fallback(failing_build):
    with pytest.raises(RuntimeError, match=r'could not be built: .*identifier "x" is undefined'):
        wkv_cuda.op()
