"""WKV-7 CUDA kernel benchmark: forward and forward+backward times against the memory-traffic floor, fla's
chunk_rwkv7 (when installed) and, at a short length, the plain-torch twin.

    python -m bench.wkv7 [--dtype bf16] [--twin_tokens 128]

Shapes (B, T, H) with head size 64: B1 T4096 H12 (D768, the L12 D768 model), B1 T4096 H40 (D2560, the 2.9B) and B8
T4096 H12 (enough blocks to fill the card). Per shape:
- kernel: the extension's forward call, and forward + backward calls, alone;
- op: the autograd op as the model calls it (wkv7_cuda: Function, casts, allocations), forward + backward;
- floor: the bytes the operator cannot avoid moving, at the device-to-device copy bandwidth measured in this run:
  forward reads r, w, k, v, a, b and writes y, backward reads them and dy and writes their six gradients, 20 B*T*C
  elements in all (the states, B*H*N*N, are negligible). The kernel moves more: S_{t-1} a_t (fp32, written and read)
  and a state every 16 tokens (fp32, written once, read up to twice);
- fla: flash-linear-attention's chunk_rwkv7 forward + backward, if it imports, with the same inputs (it takes the
  log-decay -exp(-softplus(-w) - 0.5) and a, b as given, and its state transposed: key rows); "y vs ours" is the
  relative RMS difference of its y from the kernel's.
Then the twin (wkv7_torch, a loop over tokens through autograd) against the op at T = --twin_tokens: the twin is too
slow to time at 4096. Times are CUDA-event means over back-to-back calls (median of several rounds), with inputs
rotated so no call finds its inputs in L2 from the previous one.
"""
import argparse
import math

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth, print_run_header, time_ms
from src.models.rwkv7 import wkv_cuda
from src.models.rwkv7.wkv import wkv7_torch

SHAPES = [(1, 4096, 12), (1, 4096, 40), (8, 4096, 12)]
N = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOOR_ELEMENTS = 20  # per B*T*C: forward 6 in + y out; backward 6 in + dy in + 6 gradients out


def make_sets(B, T, H, dtype, count):
    """`count` input sets (r, w, k, v, a, b, s0, dy, dsT) on the GPU, as the model makes them (a = -kk,
    b = kk * rate with kk of unit norm); s0 and dsT fp32."""
    sets = []
    for _ in range(count):
        r, w, k, v = (torch.randn(B, T, H, N, device="cuda") for _ in range(4))
        kk = F.normalize(torch.randn(B, T, H, N, device="cuda"), dim=-1)
        heads = [t.to(dtype) for t in (r, w, k, v, -kk, kk * torch.rand(B, T, H, N, device="cuda"))]
        s0, dsT = torch.randn(B, H, N, N, device="cuda"), torch.randn(B, H, N, N, device="cuda")
        sets.append((*heads, s0, torch.randn(B, T, H, N, device="cuda").to(dtype), dsT))
    return sets


def set_count(B, T, H, dtype) -> int:
    """Input sets enough for consecutive calls' inputs to exceed twice the L2 cache."""
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, math.ceil(2 * l2_bytes / (7 * B * T * H * N * dtype.itemsize)))


def autograd_fwd_bwd(op, sets):
    """fn(i): op on set i's six inputs and s0 (all requiring gradients), then the backward of <y, dy> + <sT, dsT>."""
    leaves = [[x.clone().requires_grad_() for x in st[:7]] for st in sets]

    def fn(i):
        tensors, (dy, dsT) = leaves[i % len(sets)], sets[i % len(sets)][7:]
        y, sT = op(*tensors)
        torch.autograd.backward([y, sT], [dy, dsT])

    return fn


def fla_chunk_rwkv7():
    """fla's chunk_rwkv7 as (r, w, k, v, a, b, s0) -> (y, sT) in our contract, or None when fla is not installed."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError:
        return None

    def op(r, w, k, v, a, b, s0):
        log_decay = (-math.exp(-0.5) * torch.sigmoid(w.float())).to(r.dtype)  # = -exp(-softplus(-w) - 0.5)
        y, sT = chunk_rwkv7(r, log_decay, k, v, a, b, scale=1.0, initial_state=s0.transpose(-1, -2).contiguous(),
                            output_final_state=True)
        return y, sT.transpose(-1, -2)

    return op


def bench_fla(sets, calls):
    """fla's forward + backward ms and its y's relative difference from the kernel's, or the error it raised."""
    op = fla_chunk_rwkv7()
    if op is None:
        return "not installed"
    try:
        y_fla = op(*sets[0][:7])[0].float()
        y_ours = wkv_cuda.wkv7_cuda(*sets[0][:7])[0].float()
        difference = ((y_fla - y_ours).norm() / y_ours.norm()).item()
        return f"{time_ms(autograd_fwd_bwd(op, sets), calls):.3f} ms, y vs ours {difference:.1e}"
    except Exception as exc:  # a version with another signature: say so, time the rest
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def bench_shape(shape, dtype, bandwidth):
    B, T, H = shape
    sets = make_sets(B, T, H, dtype, set_count(B, T, H, dtype))
    ext = wkv_cuda.EXTENSION.module()

    def fwd(i):
        ext.forward(*sets[i % len(sets)][:7])

    def fwd_bwd(i):
        r, w, k, v, a, b, s0, dy, dsT = sets[i % len(sets)]
        _, _, sa, states = ext.forward(r, w, k, v, a, b, s0)
        ext.backward(r, w, k, v, a, b, s0, sa, states, dy, dsT)

    calls = 10
    floor = FLOOR_ELEMENTS * B * T * H * N * dtype.itemsize / bandwidth * 1e3
    return dict(fwd=time_ms(fwd, calls), fwd_bwd=time_ms(fwd_bwd, calls),
                op=time_ms(autograd_fwd_bwd(wkv_cuda.wkv7_cuda, sets), calls), floor=floor,
                fla=bench_fla(sets, calls))


def bench_twin(B, H, dtype, tokens):
    """The twin and the op, forward + backward ms, at `tokens` tokens."""
    sets = make_sets(B, tokens, H, dtype, 1)
    return (time_ms(autograd_fwd_bwd(wkv7_torch, sets), calls=2, rounds=3),
            time_ms(autograd_fwd_bwd(wkv_cuda.wkv7_cuda, sets), calls=10))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--twin_tokens", type=int, default=128, help="T of the twin's comparison")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print_run_header("bench.wkv7", argv, card_details=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s; dtype {args.dtype}; head size {N}\n")
    header = (f"{'B,T,H':>14} | {'fwd ms':>7} | {'fwd+bwd ms':>10} | {'floor ms':>8} | {'/floor':>7} | "
              f"{'op fwd+bwd':>10} | {'ns/token':>8} | fla chunk_rwkv7 fwd+bwd")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        r = bench_shape(shape, dtype, bandwidth)
        B, T, H = shape
        print(f"{str(shape):>14} | {r['fwd']:7.3f} | {r['fwd_bwd']:10.3f} | {r['floor']:8.3f} | "
              f"{r['fwd_bwd'] / r['floor']:7.1f} | {r['op']:10.3f} | {r['fwd_bwd'] * 1e6 / (B * T):8.1f} | {r['fla']}")
    print(f"\nfloor: {FLOOR_ELEMENTS} B*T*C elements moved once at the copy bandwidth; op: the autograd op "
          f"(wkv7_cuda) forward + backward; ns/token: kernel fwd+bwd per token of B*T\n")
    header = f"{'B,T,H':>14} | {'twin fwd+bwd ms':>15} | {'op fwd+bwd ms':>13} | {'twin / op':>9}"
    print(header)
    print("-" * len(header))
    for B, _, H in SHAPES:
        twin, op = bench_twin(B, H, dtype, args.twin_tokens)
        print(f"{str((B, args.twin_tokens, H)):>14} | {twin:15.1f} | {op:13.3f} | {twin / op:9.0f}")


if __name__ == "__main__":
    main()
