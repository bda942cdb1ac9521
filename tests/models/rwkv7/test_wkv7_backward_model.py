"""A PyTorch model of the WKV-7 CUDA kernel's algorithm (src/models/rwkv7/cuda/wkv7_cuda.cu), checked on the CPU
against autograd through the twin `wkv7_torch`. The forward pass keeps S_{t-1} a_t of every token and the state after
every chunk of 16 tokens. The backward pass walks the tokens in reverse carrying the adjoint G_t = dL/dS_t and
recovers S_{t-1} from S_t by inverting the step (only the decay is divided out: sa_t is stored), in runs of at most
8 inverse steps, each run starting from an exact state: the chunk's snapshot, or the state replayed forward from the
previous snapshot (or s0), which with sa_t stored is the forward's own arithmetic.

In fp64 the algorithm equals autograd to rounding. In fp32 each inverse step multiplies rounding errors by up to
1 / decay_min = e^{e^{-0.5}} = 1.83: with runs of 8, the gradients that read recovered states (r, w, a) stay within
~5e-7 of fp64 for decays spread over their range and ~2e-6 with every decay at the floor, the worst case (runs of 16,
inverse steps from the snapshots only, measure 4e-6 and 2e-4); the others within ~3e-7, as the twin's own fp32.
"""
import math

import pytest
import torch

from src.models.rwkv7.wkv import decay_of, wkv7_torch

CHUNK = 16  # tokens between snapshots
RUN = 8  # inverse steps in a row at most
DECAY_SCALE = -math.exp(-0.5)  # decay = exp(DECAY_SCALE * sigmoid(w))
NAMES = ("r", "w", "k", "v", "a", "b", "s0")


def decay_slope(w: torch.Tensor) -> torch.Tensor:
    """d decay / d w = decay * (-e^-0.5) * sigmoid(w) * sigmoid(-w), as the kernel computes it."""
    return decay_of(w) * DECAY_SCALE * torch.sigmoid(w) * torch.sigmoid(-w)


def step(state, decay, sa, b, v, k):
    """S_t = S_{t-1} diag(decay) + sa b^T + v k^T for (B, H, N, N) states and (B, H, N) vectors."""
    return state * decay[..., None, :] + sa[..., :, None] * b[..., None, :] + v[..., :, None] * k[..., None, :]


def forward_model(r, w, k, v, a, b, s0):
    """The kernel's forward: (y, sT, sa (B, T, H, N), states (B, H, ceil(T / 16), N, N)), in the inputs' dtype."""
    decay = decay_of(w)
    state, ys, sas, snapshots = s0.clone(), [], [], []
    T = r.shape[1]
    for t in range(T):
        sa = (state @ a[:, t, :, :, None]).squeeze(-1)  # (B, H, N)
        state = step(state, decay[:, t], sa, b[:, t], v[:, t], k[:, t])
        ys.append((state @ r[:, t, :, :, None]).squeeze(-1))
        sas.append(sa)
        if t % CHUNK == CHUNK - 1 or t == T - 1:
            snapshots.append(state)
    return torch.stack(ys, 1), state, torch.stack(sas, 1), torch.stack(snapshots, 2)


def replay(start, decay, sa, b, v, k, first, last):
    """The state after token `last`, stepped forward from `start`, the state before token `first`."""
    state = start
    for t in range(first, last + 1):
        state = step(state, decay[:, t], sa[:, t], b[:, t], v[:, t], k[:, t])
    return state


def backward_model(r, w, k, v, a, b, s0, sa, states, dy, dsT):
    """The kernel's backward: (dr, dw, dk, dv, da, db, ds0) from s0, the saved sa and the snapshots."""
    decay, slope = decay_of(w), decay_slope(w)
    T = r.shape[1]
    grads = {name: torch.zeros_like(r) for name in "rwkvab"}
    g = dsT.clone()  # G, the gradient reaching the current state through the later tokens
    for c in reversed(range(states.shape[2])):
        first, last = c * CHUNK, min((c + 1) * CHUNK, T) - 1
        chunk_start = states[:, :, c - 1] if c > 0 else s0
        state = states[:, :, c]  # S after the chunk's last token, exact
        for t in reversed(range(first, last + 1)):
            if t < last and (t - first + 1) % RUN == 0:  # the last token of an earlier run: replayed, exact
                state = replay(chunk_start, decay, sa, b, v, k, first, t)
            x = {name: tensor[:, t] for name, tensor in zip("rkvab", (r, k, v, a, b))}  # (B, H, N) each
            dy_t, sa_t, decay_t = dy[:, t], sa[:, t], decay[:, t]
            g = g + dy_t[..., :, None] * x["r"][..., None, :]                     # G_t gets dy_t r_t^T
            grads["r"][:, t] = (state.transpose(-1, -2) @ dy_t[..., None]).squeeze(-1)  # S_t^T dy_t
            grads["v"][:, t] = (g @ x["k"][..., None]).squeeze(-1)                 # G_t k_t
            dsa = (g @ x["b"][..., None]).squeeze(-1)                              # G_t b_t
            grads["k"][:, t] = (g.transpose(-1, -2) @ x["v"][..., None]).squeeze(-1)
            grads["b"][:, t] = (g.transpose(-1, -2) @ sa_t[..., None]).squeeze(-1)
            state = (state - x["v"][..., :, None] * x["k"][..., None, :]
                     - sa_t[..., :, None] * x["b"][..., None, :]) / decay_t[..., None, :]  # S_{t-1}
            grads["w"][:, t] = (g * state).sum(-2) * slope[:, t]
            grads["a"][:, t] = (state.transpose(-1, -2) @ dsa[..., None]).squeeze(-1)
            g = g * decay_t[..., None, :] + dsa[..., :, None] * x["a"][..., None, :]  # G_{t-1} less dy r^T
    return (*(grads[name] for name in "rwkvab"), g)


def inputs(B, T, H, N, dtype, seed=0, w_shift=0.0):
    """r, w, k, v, a, b as the model makes them (a = -kk, b = kk * rate, kk of unit norm), a carried state s0, and
    the gradients dy, dsT."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    rate = torch.rand(B, T, H, N, generator=gen, dtype=torch.float64)
    tensors = (randn(B, T, H, N), 2 * randn(B, T, H, N) + w_shift, randn(B, T, H, N), randn(B, T, H, N), -kk,
               kk * rate, randn(B, H, N, N), randn(B, T, H, N), randn(B, H, N, N))
    return [t.to(dtype) for t in tensors]


def model_gradients(r, w, k, v, a, b, s0, dy, dsT):
    y, sT, sa, states = forward_model(r, w, k, v, a, b, s0)
    return (y, sT), backward_model(r, w, k, v, a, b, s0, sa, states, dy, dsT)


def autograd_gradients(r, w, k, v, a, b, s0, dy, dsT):
    leaves = [t.detach().clone().requires_grad_() for t in (r, w, k, v, a, b, s0)]
    y, sT = wkv7_torch(*leaves)
    torch.autograd.backward([y, sT], [dy, dsT])
    return (y.detach(), sT.detach()), tuple(leaf.grad for leaf in leaves)


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("T", [1, 8, 9, 15, 16, 17, 25, 40])
def test_the_algorithm_equals_autograd_in_fp64(T):
    tensors = inputs(2, T, 3, 8, torch.float64)
    (y, sT), got = model_gradients(*tensors)
    (y_ref, sT_ref), want = autograd_gradients(*tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sT, sT_ref, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(NAMES, got, want):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("w_shift,tolerance", [(0.0, 2e-6), (8.0, 1e-5)],
                         ids=["spread_decays", "decays_at_floor"])
def test_fp32_inverse_steps_stay_accurate(w_shift, tolerance):
    """Head size 64 as the kernel, 100 tokens, compared with fp64 autograd (see the module docstring)."""
    tensors = inputs(1, 100, 2, 64, torch.float64, w_shift=w_shift)
    _, want = autograd_gradients(*tensors)
    _, got = model_gradients(*(t.float() for t in tensors))
    errors = {name: rel_err(g.double(), e) for name, g, e in zip(NAMES, got, want)}
    print(errors)
    assert all(err <= tolerance for err in errors.values()), errors
    assert all(errors[name] <= 1e-6 for name in ("k", "v", "b", "s0"))  # no recovered state in these


def test_replayed_states_are_the_forward_states_bit_for_bit():
    """Replaying a chunk from the state entering it, with the stored sa, repeats the forward's arithmetic."""
    r, w, k, v, a, b, s0, _, _ = inputs(1, 40, 2, 64, torch.float32)
    _, _, sa, states = forward_model(r, w, k, v, a, b, s0)
    decay = decay_of(w)
    for c in range(states.shape[2]):
        start = states[:, :, c - 1] if c > 0 else s0
        last = min((c + 1) * CHUNK, 40) - 1
        assert torch.equal(replay(start, decay, sa, b, v, k, c * CHUNK, last), states[:, :, c])


def test_decay_slope_is_the_derivative_for_every_w():
    """sigmoid(w) sigmoid(-w), not sigmoid(w) (1 - sigmoid(w)): accurate where sigmoid(w) rounds to 1."""
    w = torch.tensor([-100.0, -30.0, -3.0, 0.0, 2.5, 30.0, 100.0], dtype=torch.float64, requires_grad=True)
    decay_of(w).sum().backward()
    torch.testing.assert_close(decay_slope(w.detach()), w.grad, rtol=1e-12, atol=0)
    assert decay_slope(torch.tensor([30.0])).item() != 0  # 1 - sigmoid(30) is 0 in fp32
