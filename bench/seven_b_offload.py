"""The original's claim "full training of RWKV 7B on 24 GB", checked with our train.py.

The 7B shape (L32 D4096, vocab 50277, fresh random weights), ctx 4096, bf16,
`--strategy deepspeed_stage_2_offload --grad_cp 1 --ctx_parts 4`, on a bigger card made to look like a
24 GiB one: a filler allocation leaves 24 GiB free (DeepSpeed sizes its buffers from the card's free
memory, which torch.cuda.set_per_process_memory_fraction alone does not change: with only the fraction,
ZeRO-2 flattens the 14 GiB of bf16 weights on the GPU and runs out of memory), and the fraction caps this
process at filler + 24 GiB. Trains a few optimizer steps on random tokens and prints peak GPU memory
(without the filler), peak host memory and seconds per step. DeepSpeed's CPU Adam keeps ~115 GB of fp32
master weights and moments in host memory: run it on a machine with well over 128 GiB.

    python -m bench.seven_b_offload --gpu_gib 24 --steps 3
    python -m bench.seven_b_offload --gpu_gib 24 --steps 3 --n_layer 24 --n_embd 2048   # where the host is smaller
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train
from bench.common import StepTimes, cap_gpu_memory, peak_gib
from src.config import parse_args
from src.errors import UserInputError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory cap in GiB")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to train")
    parser.add_argument("--ctx_len", type=int, default=4096)
    parser.add_argument("--n_layer", type=int, default=32, help="a smaller model where the host cannot hold 7B")
    parser.add_argument("--n_embd", type=int, default=4096)
    parser.add_argument("--proj_dir", default="", help="output folder (default: a temporary one)")
    args = parser.parse_args()

    filler = cap_gpu_memory(args.gpu_gib)
    proj_dir = Path(args.proj_dir or tempfile.mkdtemp(prefix="rwkv-offload-"))
    proj_dir.mkdir(parents=True, exist_ok=True)
    tokens = proj_dir / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 50277, 4 * args.ctx_len * (args.steps + 2), dtype=np.int32))
    shape = f"L{args.n_layer} D{args.n_embd}"
    flags = ["--data_type", "numpy", "--data_file", str(tokens), "--vocab_size", "50277", "--proj_dir", str(proj_dir),
             "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd), "--ctx_len", str(args.ctx_len),
             "--micro_bsz", "1", "--epoch_steps", str(args.steps), "--epoch_count", "1", "--epoch_save", "0",
             "--lr_init", "1e-5", "--lr_final", "1e-5", "--precision", "bf16", "--accelerator", "gpu", "--devices", "1",
             "--strategy", "deepspeed_stage_2_offload", "--grad_cp", "1", "--ctx_parts", "4",
             "--enable_progress_bar", "0"]

    started = time.time()
    timer = StepTimes()
    try:
        code = train.train(parse_args(flags), [timer])
    except UserInputError as e:  # e.g. the memory check: the host cannot hold the offloaded optimizer
        print(f"train.py: error: {e}")
        code = 2
    wall = time.time() - started
    allocated, reserved = peak_gib(filler)
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    step_log = proj_dir / "train_steps.tsv"
    rows = [line.split("\t") for line in step_log.read_text().splitlines()[1:]] if code == 0 else []
    print("RESULT " + json.dumps({"exit": code, "shape": shape, "steps": len(rows),
                                  "losses": [float(r[2]) for r in rows], "peak_allocated_gib": allocated,
                                  "peak_reserved_gib": reserved, "peak_host_gib": peak_host,
                                  "seconds_per_step": timer.steady_seconds() if rows else None}), flush=True)
    print("\n| what | value |\n|---|---|")
    print(f"| card | {torch.cuda.get_device_name(0)}, capped at {args.gpu_gib:g} GiB |")
    print(f"| model | {shape} vocab 50277, ctx {args.ctx_len}, bf16, deepspeed_stage_2_offload, grad_cp, ctx_parts 4 |")
    print(f"| optimizer steps completed | {len(rows)} (losses {', '.join(r[2] for r in rows)}) |")
    print(f"| peak GPU memory allocated / reserved | {allocated:.2f} / {reserved:.2f} GiB |")
    print(f"| peak host memory (this process) | {peak_host:.1f} GiB |")
    if rows:
        print(f"| seconds per optimizer step (median after the first) | {timer.steady_seconds():.1f} |")
    print(f"| wall time including start-up | {wall:.0f} s |")
    return code


if __name__ == "__main__":
    sys.exit(main())
