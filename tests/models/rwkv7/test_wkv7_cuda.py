"""The WKV-7 CUDA kernel against its twin `wkv7_torch`: y, the final state and every gradient (r, w, k, v, a, b and
the carried s0), with a random gradient on the final state; pieces with the state passed on; the backend choice; the
RWKV-7 model with either backend; the binding's refusals.

GPU only (marked `gpu`; run with `python -m pytest -m gpu -p no:cacheprovider -rfE tests/models/rwkv7`). Inputs,
runs and the written tolerances are in wkv7_cases.py: fp32 within 2e-5 relative RMS of the fp64 twin; bf16 no
further from the fp64 twin than twice the bf16 twin is (same bf16-rounded inputs). TF32 is off for these tests:
the twins' matmuls are the reference and must be true fp32.
"""
import copy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from src.models.rwkv7 import wkv_cuda
from src.models.rwkv7.config import RWKV7Config
from src.models.rwkv7.family import RWKV7
from src.models.rwkv7.model import generate_init_weights
from src.models.rwkv7.wkv import wkv7, wkv7_torch
from wkv7_cases import FP32_TOL, INPUTS, NAMES, check_bf16, check_fp32, make_inputs, rel_rms, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = "cuda"
SHAPES = [(2, T, 3) for T in (1, 15, 16, 17, 100, 1000)] + [(1, 4096, 12)]
BF16_ULP = 2 ** -8  # one rounding step of bf16, relative


@pytest.fixture(autouse=True)
def true_fp32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def kernel():
    return wkv_cuda.op()  # builds the extension, or fails with the compiler's error


@pytest.mark.parametrize("B,T,H", SHAPES, ids=[f"B{B}-T{T}-H{H}" for B, T, H in SHAPES])
def test_fp32_matches_the_twin(B, T, H):
    check_fp32(kernel(), make_inputs(B, T, H, device=DEVICE), f"B{B} T{T} H{H}")


@pytest.mark.parametrize("B,T,H", SHAPES, ids=[f"B{B}-T{T}-H{H}" for B, T, H in SHAPES])
def test_bf16_matches_the_twin(B, T, H):
    check_bf16(kernel(), make_inputs(B, T, H, device=DEVICE), f"B{B} T{T} H{H}")


def test_decays_at_the_floor():
    """Every decay near e^-0.607, where the backward pass's inverse steps grow rounding errors the most."""
    check_fp32(kernel(), make_inputs(2, 1000, 3, device=DEVICE, w_shift=8.0), "decay floor")


def test_zero_initial_state():
    """s0 = None: zeros, and no gradient to return for it."""
    inp = make_inputs(2, 100, 3, device=DEVICE)
    leaves = [inp[n].clone().requires_grad_() for n in INPUTS]
    y, sT = kernel()(*leaves)
    (y * inp["dy"]).sum().backward()  # sT unused: its gradient reaches the kernel as zeros
    ref_leaves = [inp[n].double().requires_grad_() for n in INPUTS]
    y_ref, sT_ref = wkv7_torch(*ref_leaves)
    (y_ref * inp["dy"].double()).sum().backward()
    assert rel_rms(y, y_ref) <= FP32_TOL and rel_rms(sT, sT_ref) <= FP32_TOL
    for name, leaf, ref in zip(INPUTS, leaves, ref_leaves):
        assert rel_rms(leaf.grad, ref.grad) <= FP32_TOL, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_with_the_state_passed_equal_one_call(dtype):
    """wkv7(part_len=...) (--ctx_parts) and uneven pieces: the forward pass is the same arithmetic (y and sT equal
    exactly); the backward pass starts its inverse steps from other snapshots, so the gradients differ by rounding:
    FP32_TOL in fp32, one bf16 rounding step in bf16."""
    inp = make_inputs(2, 1000, 3, device=DEVICE)
    whole = run(kernel(), inp, dtype)

    def in_parts(*tensors):
        return wkv7(*tensors, backend="cuda", part_len=100)

    tolerance = FP32_TOL if dtype == torch.float32 else BF16_ULP
    for label, pieces in (("part_len 100", run(in_parts, inp, dtype)),
                          ("uneven pieces", run(kernel(), inp, dtype, split=(1, 16, 17, 300, 555, 999)))):
        assert torch.equal(pieces["y"], whole["y"]) and torch.equal(pieces["sT"], whole["sT"]), label
        err = {name: rel_rms(pieces[name], whole[name]) for name in NAMES}
        print(label, dtype, err)
        assert all(e <= tolerance for e in err.values()), (label, err)


def test_gradients_are_deterministic():
    inp = make_inputs(2, 1000, 3, device=DEVICE)
    first, second = run(kernel(), inp, torch.bfloat16), run(kernel(), inp, torch.bfloat16)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name


def test_auto_runs_the_kernel_where_it_can_and_the_twin_elsewhere():
    inp = make_inputs(1, 40, 2, device=DEVICE)
    tensors = [inp[n] for n in INPUTS]
    assert torch.equal(wkv7(*tensors, inp["s0"], backend="auto")[0], kernel()(*tensors, inp["s0"])[0])
    small = make_inputs(1, 40, 2, N=32, device=DEVICE)  # head size 32: the twin
    small_tensors = [small[n] for n in INPUTS]
    assert torch.equal(wkv7(*small_tensors, small["s0"], backend="auto")[0], wkv7_torch(*small_tensors, small["s0"])[0])
    with pytest.raises(ValueError, match="built for head size 64"):
        wkv7(*small_tensors, small["s0"], backend="cuda")
    double = [t.double() for t in tensors]  # fp64: the twin
    assert wkv7(*double, backend="auto")[0].dtype == torch.float64


def tiny_rwkv7():
    """A 2-layer RWKV-7 of head size 64 (the kernel's) with BlinkDL's init plus noise, fp32, on the GPU."""
    torch.manual_seed(0)
    model = RWKV7.build(RWKV7Config(vocab_size=37, n_layer=2, n_embd=128, head_size=64))
    model.load_state_dict(generate_init_weights(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(DEVICE)


def test_the_model_with_the_kernel_equals_the_model_with_the_twin():
    """Same loss and parameter gradients in fp32 with --wkv_backend cuda and torch: the kernel source built for the
    CPU differs from the twin by at most ~2e-6 on these gradients (about the fp32 twin's own error); limit 2e-5."""
    ref = tiny_rwkv7()
    ref.options.wkv_backend = "torch"
    fast = copy.deepcopy(ref)
    fast.options.wkv_backend = "cuda"
    idx = torch.randint(0, 37, (3, 129), device=DEVICE)
    losses = []
    for model in (ref, fast):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    print("losses", losses)
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        err = rel_rms(p_fast.grad, p_ref.grad)
        assert err <= 2e-5, f"{name}: gradient relative RMS error {err:.2e}"


# Bad inputs reaching the binding directly (src.models.rwkv7.wkv checks shapes before it); one message line each.
_BAD_INPUTS = """
import torch
from src.models.rwkv7 import wkv_cuda
ext = wkv_cuda.EXTENSION.module()
x = torch.randn(2, 5, 3, 64, device="cuda")
s0 = torch.zeros(2, 3, 64, 64, device="cuda")
cases = [(x.double(),) * 6 + (s0,), (x[..., :32].contiguous(),) * 6 + (s0[..., :32, :32].contiguous(),),
         (x, x, x.transpose(1, 2).contiguous().transpose(1, 2), x, x, x, s0), (x, x, x, x.bfloat16(), x, x, s0),
         (x, x.cpu(), x, x, x, x, s0), (x, x, x, x, x, x, s0.double()), (x[:, :0],) * 6 + (s0,)]
for args in cases:
    try:
        ext.forward(*args)
        print("accepted")
    except RuntimeError as exc:
        print(str(exc).splitlines()[0])
"""


def test_binding_rejects_bad_inputs():
    """Run in a child process, so that a crash fails this test instead of ending the test session."""
    done = subprocess.run([sys.executable, "-c", _BAD_INPUTS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0
    expected = ["r must be float32 or bfloat16, got Double", "built for head size 64", "k must be contiguous",
                "v must be Float, got BFloat16", "w must be a CUDA tensor", "s0 must be Float",
                "B, T and H must be positive"]
    lines = done.stdout.splitlines()
    assert len(lines) == len(expected) and all(e in line for e, line in zip(expected, lines)), lines
