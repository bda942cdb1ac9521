"""Held-out evaluation speed of the 7B shape: tokens/s and peak GPU memory for windows of 4K and 128K tokens, in 24 GiB.

evaluate.py's computation (src/eval/model_loader.py, src/eval/windows.py, src/eval/engine.py) on L32 D4096 vocab 50277
with random weights (bench.long_context.make_random_base, bf16, made once and shared with that benchmark):
weights in bf16 under bf16 autocast, no autograd, the WKV kernel, one window at a time (--micro_bsz 1).
Windows of 4096 tokens run in one pass; longer ones with --state_cp in segments of 4096 tokens
(--ctx_parts ctx_len / 4096), which is what lets a 1M-token window run in the memory of one segment. Each
length runs in a process of its own on a card made to look like a 24 GiB one (bench.common.cap_gpu_memory,
as in bench.long_context). The first 4096 tokens of a window warm up (the kernel build, cuBLAS); then the
measured windows: tokens/s is their input tokens over their wall time. Peak memory covers the whole process,
weights included, without the filler.

The hardware limit beside it: a forward costs 2 N FLOPs per token (N = 7.2e9 non-embedding parameters, the head
included), so the bf16 matmul rate measured in the same run allows rate / (2 N) tokens/s.

    python -m bench.evaluate_speed                                  # 4096 131072
    python -m bench.evaluate_speed --lengths 4096 131072 1048576
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import cap_gpu_memory, peak_gib
from bench.long_context import NON_EMBEDDING_PARAMS, SEGMENT, SHAPE, run_each_length

MEASURED_WINDOWS = {4096: 32, 32768: 4, 131072: 2, 1048576: 1}  # after the warm-up window: 128K-1M tokens each


def window_flags(ctx_len: int) -> dict:
    """evaluate.py's window flags for one length: a single pass up to SEGMENT tokens, --state_cp beyond."""
    if ctx_len <= SEGMENT:
        return {"ctx_len": ctx_len, "ctx_parts": None, "state_cp": 0}
    return {"ctx_len": ctx_len, "ctx_parts": -(-ctx_len // SEGMENT), "state_cp": 1}


def random_tokens(ctx_len: int, windows: int, folder: Path) -> Path:
    """A .npy of random token ids holding exactly `windows` windows of ctx_len (window rule: windows * L + 1)."""
    path = folder / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, SHAPE["vocab_size"], windows * ctx_len + 1, dtype=np.int32))
    return path


def run_one_length(args) -> int:
    """Child process: cap the card, evaluate a warm-up window and the measured ones, print a RESULT line."""
    from src.eval import engine, model_loader
    from src.eval.windows import load_windows
    from src.config import TrainConfig
    from src.data.dataset import DataFile

    filler = cap_gpu_memory(args.gpu_gib)
    measured = MEASURED_WINDOWS.get(args.ctx_len, 1)
    tokens = random_tokens(args.ctx_len, 1 + measured, Path(tempfile.mkdtemp(prefix=f"eval{args.ctx_len}-")))
    cfg = TrainConfig(data_type="numpy", data_file=str(tokens), vocab_size=SHAPE["vocab_size"],
                      micro_bsz=args.micro_bsz, precision="bf16", accelerator="gpu", wkv_backend="cuda",
                      **window_flags(args.ctx_len)).finalize()
    model = model_loader.load_model(args.weights, device="cuda", dtype=torch.bfloat16,
                                    flags=cfg)
    windows = load_windows(DataFile.from_flags(cfg))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x, y = windows[0]  # warm-up: one segment's worth of the first window (kernel build, cuBLAS)
        engine.evaluate(model, [(x[:SEGMENT], y[:SEGMENT])], cfg.ctx_len, 1, cfg.segment_len, device="cuda")
        result = engine.evaluate(model, [windows[k] for k in range(1, len(windows))], cfg.ctx_len,
                                     cfg.micro_bsz, cfg.segment_len, device="cuda")
    allocated, reserved = peak_gib(filler)
    print("RESULT " + json.dumps({
        "ctx_len": args.ctx_len, "segment_len": cfg.segment_len, "windows": result.windows,
        "micro_bsz": cfg.micro_bsz, "tokens_per_s": result.tokens_per_s, "seconds": result.seconds,
        "loss": result.loss, "peak_allocated_gib": allocated, "peak_reserved_gib": reserved}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 131072])
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory cap in GiB")
    parser.add_argument("--micro_bsz", type=int, default=1, help="windows evaluated together")
    parser.add_argument("--weights", default="", help="7B .pth to evaluate (default: random, made once)")
    parser.add_argument("--ctx_len", type=int, help=argparse.SUPPRESS)  # child process: one length
    args = parser.parse_args()
    if args.ctx_len:
        return run_one_length(args)

    tflops, results = run_each_length("bench.evaluate_speed", args, ("--micro_bsz", str(args.micro_bsz)))
    limit = tflops * 1e12 / (2 * NON_EMBEDDING_PARAMS)
    print(f"\n{torch.cuda.get_device_name(0)}, capped at {args.gpu_gib:g} GiB; bf16 matmul {tflops:.0f} TFLOP/s "
          f"(8192^3), so the matmul limit of an evaluation forward is {limit:,.0f} tokens/s")
    print("\n| window | segments of | windows x micro_bsz | tokens/s | of the limit | peak allocated / reserved GiB "
          "| loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        segments = f"{r['segment_len']:,}" if r["segment_len"] else "one pass"
        print(f"| {r['ctx_len']:,} | {segments} | {r['windows']} x {r['micro_bsz']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / limit:.0%} | "
              f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} | {r['loss']:.3f} |")
    return 0 if len(results) == len(args.lengths) else 1


if __name__ == "__main__":
    sys.exit(main())
