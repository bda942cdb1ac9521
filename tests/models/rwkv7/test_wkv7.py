"""The WKV-7 operator's plain-torch twin: the rwkv package's recurrence, token by token; one call equals the same
sequence in pieces with the state passed on (outputs, final state and every gradient, the initial state's included);
--ctx_parts' part length changes nothing."""
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


def test_bad_shapes_and_backends_are_refused():
    r, w, k, v, a, b, s0 = inputs()
    with pytest.raises(ValueError, match="must all be"):
        wkv7(r, w[:, :2], k, v, a, b, s0)
    with pytest.raises(ValueError, match="state must be"):
        wkv7(r, w, k, v, a, b, s0[:, :1])
    with pytest.raises(ValueError, match="does not exist yet"):
        wkv7(r, w, k, v, a, b, s0, backend="cuda")
