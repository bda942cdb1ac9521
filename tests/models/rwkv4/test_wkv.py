"""The torch WKV backend: the literal formula, gradcheck, chaining with state, calls in parts (--ctx_parts)."""
import pytest
import torch

from src.models.rwkv4.wkv import wkv, wkv_formula, wkv_torch
from src.models.rwkv4.state import EMPTY_PP, empty_state


def random_inputs(B, T, C, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, generator=g, dtype=torch.float64) * scale
    u = torch.randn(C, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v)]


def random_state(B, C, dtype=torch.float64, seed=1):
    """A state some earlier tokens could have produced: positive sums, moderate exponent."""
    g = torch.Generator().manual_seed(seed)
    aa = torch.randn(B, C, generator=g, dtype=torch.float64)
    bb = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.5
    pp = torch.randn(B, C, generator=g, dtype=torch.float64)
    return torch.stack([aa, bb, pp], dim=-1).to(dtype)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_reference_equals_literal_formula(T, with_state):
    w, u, k, v = random_inputs(2, T, 5)
    state = random_state(2, 5) if with_state else None
    y, _ = wkv_torch(w, u, k, v, state)
    torch.testing.assert_close(y, wkv_formula(w, u, k, v, state), rtol=1e-12, atol=1e-12)


def test_final_state_represents_the_running_sums():
    """a = aa*e^pp and b = bb*e^pp are the decayed sums of e^k v and e^k."""
    w, u, k, v = random_inputs(1, 6, 3)
    _, state = wkv_torch(w, u, k, v)
    decay = -torch.exp(w)
    steps = torch.arange(5, -1, -1, dtype=torch.float64).reshape(1, 6, 1)
    weights = torch.exp(steps * decay + k)
    torch.testing.assert_close(state[..., 0] * torch.exp(state[..., 2]), (weights * v).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(state[..., 1] * torch.exp(state[..., 2]), weights.sum(1), rtol=1e-12, atol=0)


def test_gradcheck_all_inputs_including_state():
    w, u, k, v = random_inputs(2, 4, 3)
    state = random_state(2, 3)
    inputs = [x.requires_grad_() for x in (w, u, k, v, state)]

    def f(w, u, k, v, state):
        y, out = wkv_torch(w, u, k, v, state)
        # a loss that reads the output state only through a and b (what a next call would see)
        return y, out[..., 0] * torch.exp(out[..., 2]), out[..., 1] * torch.exp(out[..., 2])

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _all_grads(f, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    loss = f(*tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("splits", [[3], [1, 5], [2, 3, 4, 6]])
def test_chaining_equals_one_call_in_outputs_and_every_gradient(splits):
    T = 8
    w, u, k, v = random_inputs(2, T, 4)
    state = random_state(2, 4)
    gy = torch.randn(2, T, 4, dtype=torch.float64)

    def one_call(w, u, k, v, state):
        y, out = wkv_torch(w, u, k, v, state)
        return (y * gy).sum() + (out[..., 0] * torch.exp(out[..., 2])).sum()

    def chained(w, u, k, v, state):
        ys, bounds = [], [0] + splits + [T]
        for a, b in zip(bounds, bounds[1:]):
            y, state = wkv_torch(w, u, k[:, a:b], v[:, a:b], state)
            ys.append(y)
        return (torch.cat(ys, 1) * gy).sum() + (state[..., 0] * torch.exp(state[..., 2])).sum()

    loss_a, grads_a = _all_grads(one_call, [w, u, k, v, state])
    loss_b, grads_b = _all_grads(chained, [w, u, k, v, state])
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for name, ga, gb in zip("w u k v state".split(), grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("part_len", [1, 3, 7, 100])
def test_part_len_changes_nothing(part_len):
    w, u, k, v = random_inputs(2, 10, 4, dtype=torch.float32)
    y_full, s_full = wkv(w, u, k, v, backend="torch")
    y_parts, s_parts = wkv(w, u, k, v, backend="torch", part_len=part_len)
    torch.testing.assert_close(y_parts, y_full, rtol=0, atol=0)
    torch.testing.assert_close(s_parts, s_full, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_output_in_k_dtype_state_in_fp32(dtype):
    w, u, k, v = random_inputs(2, 5, 4, dtype=dtype)
    y, state = wkv_torch(w.float(), u.float(), k, v)
    assert y.dtype == dtype and state.dtype == torch.float32
    y32, _ = wkv_torch(w.float(), u.float(), k.float(), v.float())
    # the only difference is rounding the output to the I/O dtype
    torch.testing.assert_close(y.float(), y32.to(dtype).float(), rtol=0, atol=0)


def test_empty_state_is_the_same_as_no_state():
    w, u, k, v = random_inputs(3, 4, 2)
    state = empty_state(3, 2)
    assert state.dtype == torch.float32 and (state[..., :2] == 0).all()
    assert (state[..., 2] == torch.tensor(EMPTY_PP, dtype=torch.float32)).all()
    state = state.double()
    torch.testing.assert_close(wkv_torch(w, u, k, v, state)[0], wkv_torch(w, u, k, v)[0], rtol=0, atol=0)


def test_large_values_stay_finite():
    g = torch.Generator().manual_seed(3)
    C = 16
    w, u = (torch.rand(C, generator=g) * 20 - 10 for _ in range(2))
    k = torch.rand(2, 64, C, generator=g) * 80 - 40
    v = torch.randn(2, 64, C, generator=g)
    inputs = [x.requires_grad_() for x in (w, u, k, v)]
    y, state = wkv_torch(*inputs)
    (y.sum() + state[..., :2].sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    # same values as float64 up to fp32 rounding (relative RMS error): the max-exponent form loses nothing
    y64, _ = wkv_torch(*(x.detach().double() for x in (w, u, k, v)))
    assert (y.detach().double() - y64).norm() / y64.norm() < 1e-5


def test_shape_errors_are_clear():
    w, u, k, v = random_inputs(1, 3, 4)
    with pytest.raises(ValueError, match="w and u must be"):
        wkv(w[:2], u, k, v)
    with pytest.raises(ValueError, match="state must be"):
        wkv(w, u, k, v, torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        wkv(w, u, k, v, backend="cuda")
