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
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory cap in GiB")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to train")
    parser.add_argument("--ctx_len", type=int, default=4096)
    parser.add_argument("--proj_dir", default="", help="output folder (default: a temporary one)")
    args = parser.parse_args()

    cap = int(args.gpu_gib * 2**30)
    free, total = torch.cuda.mem_get_info(0)
    filler = torch.empty(max(free - cap, 0), dtype=torch.uint8, device="cuda:0")
    torch.cuda.set_per_process_memory_fraction((filler.numel() + cap) / total, 0)
    torch.cuda.reset_peak_memory_stats(0)
    proj_dir = Path(args.proj_dir or tempfile.mkdtemp(prefix="rwkv7b-"))
    proj_dir.mkdir(parents=True, exist_ok=True)
    tokens = proj_dir / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 50277, 4 * args.ctx_len * (args.steps + 2), dtype=np.int32))

    started = time.time()
    code = train.main([
        "--data_type", "numpy", "--data_file", str(tokens), "--vocab_size", "50277", "--proj_dir", str(proj_dir),
        "--n_layer", "32", "--n_embd", "4096", "--ctx_len", str(args.ctx_len), "--micro_bsz", "1",
        "--epoch_steps", "1000", "--epoch_count", "100", "--epoch_save", "0", "--max_steps", str(args.steps),
        "--lr_init", "1e-5", "--lr_final", "1e-5", "--precision", "bf16", "--accelerator", "gpu", "--devices", "1",
        "--strategy", "deepspeed_stage_2_offload", "--grad_cp", "1", "--ctx_parts", "4", "--enable_progress_bar", "0"])
    wall = time.time() - started
    if code != 0:
        print(f"train.py exited with {code}")
        return code

    rows = [line.split("\t") for line in (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]]
    speed_kts = float(rows[-1][6])  # average over this run's steps
    peak_gpu = (torch.cuda.max_memory_allocated(0) - filler.numel()) / 2**30
    peak_reserved = (torch.cuda.max_memory_reserved(0) - filler.numel()) / 2**30
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print("\n| what | value |\n|---|---|")
    print(f"| card | {torch.cuda.get_device_name(0)}, capped at {args.gpu_gib:g} GiB |")
    print(f"| model | L32 D4096 vocab 50277, ctx {args.ctx_len}, bf16, deepspeed_stage_2_offload, grad_cp, "
          f"ctx_parts 4 |")
    print(f"| optimizer steps completed | {len(rows)} (losses {', '.join(r[2] for r in rows)}) |")
    print(f"| peak GPU memory allocated / reserved | {peak_gpu:.2f} / {peak_reserved:.2f} GiB |")
    print(f"| peak host memory (this process) | {peak_host:.1f} GiB |")
    print(f"| seconds per optimizer step (mean over the run) | {args.ctx_len / (speed_kts * 1000):.1f} |")
    print(f"| wall time including start-up | {wall:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
