"""The WKV-7 operator's plain-torch twin: the rwkv package's recurrence, token by token; one call equals the same
sequence in pieces with the state passed on (outputs, final state and every gradient, the initial state's included);
--ctx_parts' part length changes nothing. The backends on the CPU: "auto" runs the twin, "cuda" refuses what the
kernel cannot take, a failed kernel build falls back to the twin with one warning (or raises without a fallback)."""
import warnings

import pytest
import torch

from src.models.rwkv7.wkv import decay_of, wkv7, wkv7_torch

B, T, H, N = 2, 13, 3, 4


def inputs(dtype=torch.float64, seed=0):
    """r, w, k, v, a, b (B, T, H, N) as the model makes them (a = -kk, b = kk * rate with kk of unit norm) and a
    non-zero initial state, all requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    r, w, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(4))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    rate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    tensors = [t.to(dtype) for t in (r, w * 2, k, v, -kk, kk * rate)]
    s0 = s0.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return [t.requires_grad_(True) for t in (*tensors, s0)]


def test_one_step_is_the_rwkv_package_formula():
    """state = state * w + state @ (a b^T) + v k^T, y = state r (RWKV_x070_TMix_one, head by head)."""
    r, w, k, v, a, b, s0 = (t.detach() for t in inputs())
    y, state = wkv7_torch(r[:, :1], w[:, :1], k[:, :1], v[:, :1], a[:, :1], b[:, :1], s0)
    for batch in range(B):
        for h in range(H):
            decay = torch.exp(-0.606531 * torch.sigmoid(w[batch, 0, h]))  # the package's CPU form of the clamp
            ab = a[batch, 0, h].view(N, 1) @ b[batch, 0, h].view(1, N)
            vk = v[batch, 0, h].view(N, 1) @ k[batch, 0, h].view(1, N)
            expected = s0[batch, h] * decay.view(1, N) + s0[batch, h] @ ab + vk
            torch.testing.assert_close(state[batch, h], expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(y[batch, 0, h], expected @ r[batch, 0, h], rtol=1e-6, atol=1e-6)


def test_decay_is_soft_clamped_below_exp_minus_half():
    w = torch.tensor([-8.0, -1.0, 0.0, 3.0, 50.0], dtype=torch.float64)
    d = decay_of(w)
    floor = torch.exp(-torch.exp(torch.tensor(-0.5, dtype=torch.float64)))  # exp(-0.6065...) = 0.545
    assert torch.all(d < 1) and torch.all(d >= floor) and torch.all(d[1:] < d[:-1])


def _grads(outputs, tensors):
    y, sT = outputs
    loss = (y * y - torch.tanh(y)).sum() + 3 * (sT * sT + torch.tanh(sT)).sum()  # gradients through sT too
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("s0_given", [True, False], ids=["carried_state", "zero_state"])
def test_chained_calls_equal_one_call(s0_given):
    tensors = inputs()
    r, w, k, v, a, b, s0 = tensors
    s0_or_none = s0 if s0_given else None
    whole = wkv7_torch(r, w, k, v, a, b, s0_or_none)
    expected = _grads(whole, tensors[:6] + ([s0] if s0_given else []))
    state, ys = s0_or_none, []
    for start, end in [(0, 4), (4, 5), (5, 13)]:  # uneven pieces, one of a single token
        y, state = wkv7_torch(*(t[:, start:end] for t in (r, w, k, v, a, b)), state)
        ys.append(y)
    pieces = (torch.cat(ys, 1), state)
    torch.testing.assert_close(pieces[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pieces[1], whole[1], rtol=1e-12, atol=1e-12)
    got = _grads(pieces, tensors[:6] + ([s0] if s0_given else []))
    for name, g, e in zip("rwkvabs", got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)
    if s0_given:
        assert got[-1].abs().max() > 0  # the initial state's gradient reaches it


def test_gradcheck_including_the_state():
    r, w, k, v, a, b, s0 = inputs()
    short = [t[:, :3].detach().requires_grad_(True) for t in (r, w, k, v, a, b)]
    assert torch.autograd.gradcheck(lambda *xs: wkv7_torch(*xs), (*short, s0.detach().requires_grad_(True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_accumulate_in_fp32_and_return_y_in_the_input_dtype(dtype):
    tensors = inputs(dtype)
    y, sT = wkv7_torch(*tensors)
    assert y.dtype == dtype and sT.dtype == torch.float32
    y64, s64 = wkv7_torch(*(t.detach().double() for t in tensors))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (y.double() - y64).norm() <= tolerance * y64.norm()
    assert (sT.double() - s64).norm() <= tolerance * s64.norm()


def test_part_length_changes_nothing():
    tensors = inputs()
    whole = wkv7(*tensors)
    parts = wkv7(*tensors, part_len=5)
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts[1], whole[1], rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_refused():
    r, w, k, v, a, b, s0 = inputs()
    with pytest.raises(ValueError, match="must all be"):
        wkv7(r, w[:, :2], k, v, a, b, s0)
    with pytest.raises(ValueError, match="state must be"):
        wkv7(r, w, k, v, a, b, s0[:, :1])


def test_auto_runs_the_twin_on_cpu():
    tensors = [t.detach().float() for t in inputs()]
    for got, want in zip(wkv7(*tensors, backend="auto"), wkv7_torch(*tensors)):
        assert torch.equal(got, want)


def test_backends_the_inputs_cannot_take_are_refused():
    """backend "cuda" names what stops the kernel (head size, dtype, device); "auto" would run the twin instead."""
    small = [t.detach().float() for t in inputs()]  # head size 4
    with pytest.raises(ValueError, match="built for head size 64, and these heads have 4 channels"):
        wkv7(*small, backend="cuda")
    wide = [torch.zeros(1, 2, 1, 64, dtype=torch.float64) for _ in range(6)]
    with pytest.raises(ValueError, match="takes fp32, bf16 or fp16 inputs, not torch.float64"):
        wkv7(*wide, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        wkv7(*(t.float() for t in wide), backend="cuda")
    with pytest.raises(ValueError, match="unknown wkv7 backend 'triton'"):
        wkv7(*small, backend="triton")


def test_the_kernel_without_tokens_passes_the_state_through():
    """T = 0 never reaches the extension: y is empty and the final state is s0 (zeros without one), as the twin."""
    from src.models.rwkv7.wkv_cuda import wkv7_cuda

    empty = [torch.zeros(2, 0, 3, 64) for _ in range(6)]
    s0 = torch.randn(2, 3, 64, 64)
    y, sT = wkv7_cuda(*empty, s0)
    assert y.shape == (2, 0, 3, 64) and torch.equal(sT, s0)
    assert torch.equal(wkv7_cuda(*empty)[1], torch.zeros(2, 3, 64, 64))


@pytest.fixture
def failing_build(monkeypatch):
    """The WKV-7 extension's build replaced by one that fails like a compiler error."""
    from src import cuda_extension
    from src.models.rwkv7 import wkv_cuda

    def fail():
        raise RuntimeError("Error building extension 'wkv7': ...\n"
                           "wkv7_cuda.cu(12): error: identifier \"x\" is undefined\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(wkv_cuda.EXTENSION, "build", fail)
    monkeypatch.setattr(wkv_cuda.EXTENSION, "_loaded", None)
    cuda_extension._warn_fallback.cache_clear()
    yield wkv_cuda
    cuda_extension._warn_fallback.cache_clear()


def test_a_failed_build_falls_back_to_the_twin_with_one_warning(failing_build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert failing_build.op(fallback=wkv7_torch) is wkv7_torch
        assert failing_build.op(fallback=wkv7_torch) is wkv7_torch
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "the WKV-7 CUDA kernel unavailable" in messages[0] and 'identifier "x" is undefined' in messages[0]
    assert "plain-torch twin" in messages[0]


def test_a_failed_build_raises_without_fallback(failing_build):
    with pytest.raises(RuntimeError, match=r'WKV-7 CUDA kernel could not be built: .*identifier "x" is undefined'):
        failing_build.op()
