"""The tiled WKV algorithm of src/models/rwkv4/cuda/wkv_cuda.cu, written in PyTorch and checked on CPU.

`wkv_chunked` is a line-by-line model of the CUDA kernels (same passes, same scaled variables, same
order of operations), vectorised over rows and tiles instead of threads. In float64 it must equal autograd
through `wkv_torch` to rounding: that proves the algebra of the kernel. In float32 its distance to the
float32 reference is the error the kernel is expected to have, which bounds the GPU tests' tolerances.

Notation (per batch b and channel c; w < 0 is -exp(time_decay)): the state after token t is
a_t = aa_t e^{pp_t}, b_t = bb_t e^{pp_t}. The backward pass carries the adjoints of the state scaled by
the same exponent, ga_t = dL/da_t * e^{pp_t} and gb_t = dL/db_t * e^{pp_t}: these never overflow, and at
t = -1 they are exactly the state gradient of the contract.
"""
import pytest
import torch

from src.models.rwkv4.wkv import wkv_torch
from src.models.rwkv4.state import empty_state


def _pair_exp(x1, x2):
    """(e^{x1-m}, e^{x2-m}) with m = max(x1, x2), using one exp: one of the two is exactly 1."""
    d = x1 - x2
    e = torch.exp(-d.abs())
    first_is_max = d >= 0
    return torch.where(first_is_max, 1.0, e), torch.where(first_is_max, e, 1.0)


def _merge(s, decay, add):
    """State s = (aa, bb, pp) decayed by e^decay, plus the summary `add` (kernel: merge)."""
    decayed = s[2] + decay
    e1, e2 = _pair_exp(decayed, add[2])
    return e1 * s[0] + e2 * add[0], e1 * s[1] + e2 * add[1], torch.maximum(decayed, add[2])


def _step(s, w, k, v):
    """One token into the state; also f = e^{w+pp-pp'} and ek = e^{k-pp'} (kernel: step)."""
    decayed = s[2] + w
    f, ek = _pair_exp(decayed, k)
    return (f * s[0] + ek * v, f * s[1] + ek, torch.maximum(decayed, k)), f, ek


def _output(s, u, k, v):
    """y and e1 = e^{pp-p}, e2 = e^{u+k-p}, inv = 1/(e1 bb + e2) (kernel: output)."""
    e1, e2 = _pair_exp(s[2], u + k)
    inv = 1.0 / (e1 * s[1] + e2)
    return (e1 * s[0] + e2 * v) * inv, e1, e2, inv


def _where(mask, new, old):
    return tuple(torch.where(mask, n, o) for n, o in zip(new, old))


def wkv_chunked(w, u, k, v, state, gy, gstate, chunk=16, rows=8):
    """Forward and backward of the kernels' algorithm: returns y, state_out, gw, gu, gk, gv, gstate_in.

    w, u (C,) raw; k, v, gy (B, T, C); state, gstate (B, C, 3); gstate[..., 2] is ignored (see the
    contract in src/models/rwkv4/wkv_cuda.py). Computes in the dtype of k. `chunk` tokens per row (one thread's) and
    `rows` rows per tile are the kernel's kChunk and kRows (16, 8); small values exercise partial tiles.
    Each block of code below is one kernel of src/models/rwkv4/cuda/wkv_cuda.cu, every thread at once.
    """
    B, T, C = k.shape
    nch = -(-T // chunk)
    tiles = -(-nch // rows)
    pad = tiles * rows * chunk - T
    w_eff = -torch.exp(w)

    def tiled(x):  # (B, T, C) -> (B, tiles, rows, chunk, C), zero-padded
        return torch.cat([x, x.new_zeros(B, pad, C)], 1).view(B, tiles, rows, chunk, C)

    kt, vt, gyt = tiled(k), tiled(v), tiled(gy)
    j = torch.arange(tiles * rows).view(tiles, rows)
    n = (T - j * chunk).clamp(max=chunk)  # (tiles, rows) tokens per row, <= 0 past the end
    exists = (n > 0)[None, :, :, None]  # (1, tiles, rows, 1)
    token_ok = (torch.arange(chunk)[None, None, :] < n[:, :, None])[None, :, :, :, None]
    n_f = n.clamp(min=0).to(k.dtype)[None, :, :, None]
    tile_len = n.clamp(min=0).sum(1).to(k.dtype)  # (tiles,)

    def summaries():  # row summaries from the empty state, (B, tiles, rows, C) each
        s = (vt[..., 0, :], torch.ones_like(vt[..., 0, :]), kt[..., 0, :])
        for i in range(1, chunk):
            s = _where(token_ok[..., i, :], _step(s, w_eff, kt[..., i, :], vt[..., i, :])[0], s)
        return s

    def entering_chunks(part, tile_in):  # warp 0: states entering each row of each tile
        s, out = tile_in, []
        for r in range(rows):
            out.append(s)
            s = _where(exists[:, :, r], _merge(s, n_f[:, :, r] * w_eff, tuple(x[:, :, r] for x in part)), s)
        return tuple(torch.stack(x, 2) for x in zip(*out))

    # (1) tile summaries
    part = summaries()
    acc = tuple(x[:, :, 0] for x in part)
    for r in range(1, rows):
        acc = _where(exists[:, :, r], _merge(acc, n_f[:, :, r] * w_eff, tuple(x[:, :, r] for x in part)), acc)
    # (2) scan over tiles: the state entering each tile, and the final state
    s, tile_in = tuple(state.unbind(-1)), []
    for q in range(tiles):
        tile_in.append(s)
        s = _merge(s, tile_len[q] * w_eff, tuple(x[:, q] for x in acc))
    state_out = torch.stack(s, -1)
    tile_in = tuple(torch.stack(x, 1) for x in zip(*tile_in))  # (B, tiles, C) each
    # (3) outputs
    chunk_in = entering_chunks(part, tile_in)  # (B, tiles, rows, C) each
    y = torch.zeros_like(kt)
    s = chunk_in
    for i in range(chunk):
        y[..., i, :] = _output(s, u, kt[..., i, :], vt[..., i, :])[0]
        s = _step(s, w_eff, kt[..., i, :], vt[..., i, :])[0]
    y = y.view(B, -1, C)[:, :T]

    # backward (3): per row G, H relative to its entering pp, and the pp it leaves with; per tile merged
    G = torch.zeros_like(chunk_in[0])
    H = torch.zeros_like(G)
    reach = torch.ones_like(G)
    s = chunk_in
    for i in range(chunk):
        m = token_ok[..., i, :]
        yt, e1, e2, inv = _output(s, u, kt[..., i, :], vt[..., i, :])
        q = gyt[..., i, :] * inv * e1
        G = torch.where(m, G + reach * q, G)
        H = torch.where(m, H - reach * q * yt, H)
        s, f, _ = _step(s, w_eff, kt[..., i, :], vt[..., i, :])
        reach = reach * f
    next_tile_pp = torch.cat([tile_in[2][:, 1:], state_out[:, None, :, 2]], 1)  # (B, tiles, C)
    pp_end = torch.cat([chunk_in[2][:, :, 1:], next_tile_pp[:, :, None]], 2)
    last_row = torch.arange(rows)[None, None, :, None] == (n > 0).sum(1)[None, :, None, None] - 1
    pp_end = torch.where(last_row, next_tile_pp[:, :, None], pp_end)  # the partial last tile ends early
    F = torch.exp(n_f * w_eff + chunk_in[2] - pp_end)
    tile_ga = torch.zeros_like(tile_in[0])
    tile_gb = torch.zeros_like(tile_ga)
    for r in reversed(range(rows)):
        e = exists[:, :, r]
        tile_ga = torch.where(e, F[:, :, r] * tile_ga + G[:, :, r], tile_ga)
        tile_gb = torch.where(e, F[:, :, r] * tile_gb + H[:, :, r], tile_gb)
    # (4) scan over tiles in reverse: the adjoint leaving each tile, and the input state's gradient
    ga, gb, end = gstate[..., 0], gstate[..., 1], state_out[..., 2]
    leave_a, leave_b = torch.zeros_like(tile_ga), torch.zeros_like(tile_ga)
    for q in reversed(range(tiles)):
        leave_a[:, q], leave_b[:, q] = ga, gb
        decay = torch.exp(tile_len[q] * w_eff + tile_in[2][:, q] - end)
        ga, gb, end = decay * ga + tile_ga[:, q], decay * gb + tile_gb[:, q], tile_in[2][:, q]
    gstate_in = torch.stack([ga, gb, ga * state[..., 0] + gb * state[..., 1]], -1)
    # (5) the adjoint leaving each row; replay the row's states; walk back through its tokens
    ga, gb = leave_a, leave_b
    chunk_ga, chunk_gb = torch.zeros_like(G), torch.zeros_like(G)
    for r in reversed(range(rows)):
        chunk_ga[:, :, r], chunk_gb[:, :, r] = ga, gb
        e = exists[:, :, r]
        ga = torch.where(e, F[:, :, r] * ga + G[:, :, r], ga)
        gb = torch.where(e, F[:, :, r] * gb + H[:, :, r], gb)
    before, s = [], chunk_in
    for i in range(chunk):
        before.append(s)
        s = _where(token_ok[..., i, :], _step(s, w_eff, kt[..., i, :], vt[..., i, :])[0], s)
    rescale = torch.exp(s[2] - pp_end)
    ga, gb = chunk_ga * rescale, chunk_gb * rescale
    gk, gv = torch.zeros_like(kt), torch.zeros_like(kt)
    gw_sum, gu_sum = torch.zeros_like(G), torch.zeros_like(G)
    for i in reversed(range(chunk)):
        m = token_ok[..., i, :]
        p = before[i]
        ki, vi = kt[..., i, :], vt[..., i, :]
        yi, e1, e2, inv = _output(p, u, ki, vi)
        _, f, ek = _step(p, w_eff, ki, vi)
        q = gyt[..., i, :] * inv
        gu_t = q * e2 * (vi - yi)
        gk[..., i, :] = gu_t + (ga * vi + gb) * ek
        gv[..., i, :] = q * e2 + ga * ek
        gu_sum = torch.where(m, gu_sum + gu_t, gu_sum)
        gw_sum = torch.where(m, gw_sum + f * (ga * p[0] + gb * p[1]), gw_sum)
        ga = torch.where(m, f * ga + q * e1, ga)
        gb = torch.where(m, f * gb - q * e1 * yi, gb)
    # (6) sums over (B, tiles, rows); the chain rule through w_eff = -exp(w) is autograd's in src/models/rwkv4/wkv_cuda.py
    gw = gw_sum.sum((0, 1, 2)) * w_eff
    gu = gu_sum.sum((0, 1, 2))
    gk, gv = (x.reshape(B, -1, C)[:, :T] for x in (gk, gv))
    return y, state_out, gw, gu, gk, gv, gstate_in


def invariant_state_grad(state_out, ga, gb):
    """The gradient of state_out = (aa, bb, pp) for a loss that sees only a = aa e^pp and b = bb e^pp,
    with dL/daa = ga and dL/dbb = gb: then dL/dpp = ga*aa + gb*bb (any consumer such as the next wkv)."""
    return torch.stack([ga, gb, ga * state_out[..., 0] + gb * state_out[..., 1]], -1)


def reference(w, u, k, v, state, gy, gstate_ab):
    """y, state_out and every gradient by autograd through wkv_torch (same order as wkv_chunked)."""
    leaves = [x.detach().clone().requires_grad_() for x in (w, u, k, v, state)]
    y, s_out = wkv_torch(*leaves)
    gs = invariant_state_grad(s_out.detach(), *gstate_ab.unbind(-1))
    torch.autograd.backward([y, s_out], [gy, gs])
    return (y.detach(), s_out.detach(), *(x.grad for x in leaves))


def random_inputs(B, T, C, dtype, scale=1.0, with_state=True):
    """Fresh random inputs; the state is a real one (the end of a random prefix), or empty."""
    w = torch.randn(C, dtype=dtype) * scale
    u = torch.randn(C, dtype=dtype) * scale
    k = torch.randn(B, T, C, dtype=dtype) * scale
    v = torch.randn(B, T, C, dtype=dtype)
    if with_state:
        state = wkv_torch(w, u, torch.randn(B, 5, C, dtype=dtype) * scale, torch.randn(B, 5, C, dtype=dtype))[1]
    else:
        state = empty_state(B, C).to(dtype)
    gy = torch.randn(B, T, C, dtype=dtype)
    gstate_ab = torch.randn(B, C, 2, dtype=dtype)
    return w, u, k, v, state, gy, gstate_ab


def rel_rms(got, want):
    error = (got.double() - want.double()).pow(2).mean().sqrt()
    return (error / want.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


NAMES = ("y", "state_out", "gw", "gu", "gk", "gv", "gstate")


def compare(B, T, C, dtype, scale=1.0, with_state=True, chunk=16, rows=8):
    w, u, k, v, state, gy, gab = random_inputs(B, T, C, dtype, scale, with_state)
    gstate = torch.cat([gab, torch.randn(B, C, 1, dtype=dtype)], -1)  # a junk gP: must be ignored
    got = wkv_chunked(w, u, k, v, state, gy, gstate, chunk, rows)
    want = reference(w, u, k, v, state, gy, gab)
    errors = {name: rel_rms(g, r) for name, g, r in zip(NAMES, got, want)}
    print(f"B{B} T{T} C{C} {dtype} scale {scale} state {with_state} chunk {chunk} rows {rows}: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    for name, g in zip(NAMES, got):
        assert torch.isfinite(g).all(), name
    if not with_state:
        assert (got[-1] == 0).all(), "the empty state's gradient is exactly 0, as autograd gives"
    return errors


@pytest.mark.parametrize("chunk,rows", [(16, 8), (16, 16), (4, 3), (1, 1), (3, 1), (1, 5)])
@pytest.mark.parametrize("B,T,C", [(1, 1, 3), (2, 15, 5), (1, 16, 4), (2, 17, 3), (3, 50, 7), (1, 300, 2)])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_algorithm_is_exact_in_float64(B, T, C, with_state, chunk, rows):
    errors = compare(B, T, C, torch.float64, with_state=with_state, chunk=chunk, rows=rows)
    for name, err in errors.items():
        assert err < 1e-10, f"{name}: relative RMS error {err:.2e} (float64 must agree to rounding)"


@pytest.mark.parametrize("chunk,rows", [(16, 8), (4, 3)])
def test_chunked_algorithm_is_exact_with_large_values(chunk, rows):
    """k ~ U(-40, 40), time_decay and time_first ~ U(-10, 10): exponents far beyond fp32 without rescaling."""
    B, T, C = 2, 300, 16
    f64 = torch.float64
    w, u = (torch.rand(C, dtype=f64) * 20 - 10 for _ in range(2))
    k = torch.rand(B, T, C, dtype=f64) * 80 - 40
    v, gy = torch.randn(B, T, C, dtype=f64), torch.randn(B, T, C, dtype=f64)
    state = wkv_torch(w, u, torch.rand(B, 3, C, dtype=f64) * 80 - 40, torch.randn(B, 3, C, dtype=f64))[1]
    gab = torch.randn(B, C, 2, dtype=f64)
    got = wkv_chunked(w, u, k, v, state, gy, torch.cat([gab, gab[..., :1]], -1), chunk, rows)
    want = reference(w, u, k, v, state, gy, gab)
    for name, g, r in zip(NAMES, got, want):
        err = rel_rms(g, r)
        print(name, f"{err:.1e}")
        assert torch.isfinite(g).all() and err < 1e-9, name


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_chunked_algorithm_float32_error(scale):
    """In float32 the algorithm differs from the float32 reference only by rounding: about 1e-6 relative
    RMS here. The CUDA kernel does the same arithmetic; tests/models/rwkv4/test_wkv_cuda.py allows 2e-5 for fp32."""
    errors = compare(2, 600, 24, torch.float32, scale=scale)
    for name, err in errors.items():
        assert err < 1e-5, f"{name}: relative RMS error {err:.2e}"
