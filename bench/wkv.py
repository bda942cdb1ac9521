"""WKV CUDA kernel benchmark: forward and forward+backward times against the memory-traffic floor.

    python -m bench.wkv [--dtype bf16] [--profile]

For each (B, T, C): the kernel alone (the extension's forward / forward + backward calls) and the whole
autograd op as the model calls it (wkv_cuda: Function, casts, allocations). The floor is the time to
move the bytes the operator cannot avoid (forward: read k, v, write y; backward: read k, v, gy, write
gk, gv) at the device-to-device copy bandwidth measured in the same run. Times are CUDA-event means
over back-to-back calls (median of several rounds), with inputs rotated so no call finds its inputs in
L2 from the previous one.
"""
import argparse
import math

import torch

from bench.common import copy_bandwidth, print_run_header, time_ms
from src.models.rwkv4 import wkv_cuda
from src.models.rwkv4.state import empty_state

SHAPES = [(1, 4096, 4096), (1, 4096, 2048), (8, 4096, 1024), (1, 65536, 4096)]
# The original toolkit's bf16 kernel on one H100 80GB HBM3, fwd and fwd+bwd ms, measured by this project on
# 2026-11-28 with the fork's own code
ORIGINAL_MS = {(1, 4096, 4096): (0.73, 2.76), (1, 4096, 2048): (0.71, 2.66), (8, 4096, 1024): (0.74, 2.98)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_sets(B, T, C, dtype, count):
    """`count` independent input sets (w_eff, u, k, v, state, gy, gstate) on the GPU, random values."""
    sets = []
    for _ in range(count):
        k, v, gy = (torch.randn(B, T, C, device="cuda").to(dtype) for _ in range(3))
        w_eff = -torch.exp(torch.randn(C, device="cuda"))
        u = torch.randn(C, device="cuda")
        state = empty_state(B, C, "cuda")
        sets.append((w_eff, u, k, v, state, gy, torch.zeros_like(state)))
    return sets


def bench_shape(shape, dtype, bandwidth, l2_bytes):
    B, T, C = shape
    size = dtype.itemsize
    n = B * T * C
    count = max(1, math.ceil(2 * l2_bytes / (3 * n * size)))  # inputs of consecutive calls exceed 2x L2
    sets = make_sets(B, T, C, dtype, count)
    ext = wkv_cuda.EXTENSION.module()

    def fwd(i):
        w, u, k, v, s, _, _ = sets[i % count]
        ext.forward(w, u, k, v, s)

    def fwd_bwd(i):
        w, u, k, v, s, gy, gs = sets[i % count]
        ext.forward(w, u, k, v, s)
        ext.backward(w, u, k, v, s, gy, gs)

    # the autograd op as src/models/rwkv4/model.py calls it: raw time_decay (any values do), u, k, v requiring grad
    leaves = [[x.clone().requires_grad_() for x in st[:4]] + [st[4], st[5]] for st in sets]

    def op_fwd_bwd(i):
        w, u, k, v, s, gy = leaves[i % count]
        y, _ = wkv_cuda.wkv_cuda(w, u, k, v, s)
        y.backward(gy)

    calls = 5 if T > 10000 else 20
    return dict(fwd=time_ms(fwd, calls), fwd_bwd=time_ms(fwd_bwd, calls), op=time_ms(op_fwd_bwd, calls),
                floor_fwd=3 * n * size / bandwidth * 1e3, floor=8 * n * size / bandwidth * 1e3)


def profile(shape, dtype):
    """Per-kernel GPU time of a few forward + backward calls."""
    B, T, C = shape
    w, u, k, v, s, gy, gs = make_sets(B, T, C, dtype, 1)[0]
    ext = wkv_cuda.EXTENSION.module()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            ext.forward(w, u, k, v, s)
            ext.backward(w, u, k, v, s, gy, gs)
        torch.cuda.synchronize()
    print(f"\nper-kernel time, 5 x fwd+bwd at B{B} T{T} C{C}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--profile", action="store_true", help="also print per-kernel times for the first shape")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print_run_header("bench.wkv", argv, card_details=True)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s; dtype {args.dtype}\n")
    header = (f"{'B,T,C':>16} | {'fwd ms':>7} | {'fwd+bwd ms':>10} | {'floor ms':>8} | {'/floor':>6} | "
              f"{'op fwd+bwd':>10} | {'ns/token':>8} | original fwd / fwd+bwd")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        r = bench_shape(shape, dtype, bandwidth, torch.cuda.get_device_properties(0).L2_cache_size)
        B, T, C = shape
        original = ORIGINAL_MS.get(shape)
        original = f"{original[0]:.2f} / {original[1]:.2f} ms" if original else "-"
        print(f"{str(shape):>16} | {r['fwd']:7.3f} | {r['fwd_bwd']:10.3f} | {r['floor']:8.3f} | "
              f"{r['fwd_bwd'] / r['floor']:6.2f} | {r['op']:10.3f} | {r['fwd_bwd'] * 1e6 / (B * T):8.1f} | {original}")
    print("\nfloor: 8 B*T*C elements moved once (fwd: k, v, y; bwd: k, v, gy, gk, gv) at the copy bandwidth;"
          " op: the autograd op (wkv_cuda) forward + backward; ns/token: fwd+bwd per token of B*T")
    if args.profile:
        profile(SHAPES[0], dtype)


if __name__ == "__main__":
    main()
