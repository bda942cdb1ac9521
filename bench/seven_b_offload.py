"""The fork's claim "full training of RWKV 7B on 24 GB", checked on the users' path with our train.py.

A released-format bf16 .pth of the 7B shape (L32 D4096, vocab 50277; random weights, written once by this script
unless --load_model names one) is fine-tuned with the fork's train.sh settings: `--load_model` it,
`--strategy deepspeed_stage_2_offload --precision bf16 --grad_cp 1 --ctx_len 4096 --ctx_parts 4 --micro_bsz 1`, a
few optimizer steps on random tokens, no weights written. The training runs in a child process on a card made to
look like a 24 GiB one: a filler allocation leaves 24 GiB free (DeepSpeed sizes its buffers from the card's free
memory, which torch.cuda.set_per_process_memory_fraction alone does not change) and the fraction caps the process
at filler + 24 GiB. This process samples the child's host memory (RSS and PSS of its process tree, and the
machine's use) twice a second; the child reports the peak of what torch pinned. Printed: losses, seconds per
step, peak GPU allocated / reserved (without the filler), peak host memory, and the memory check's estimates beside
them.

DeepSpeed's ZeRO-2 offload keeps 18 bytes per parameter in host memory (fp32 master weights, fp32 gradients, two
moments, a 16-bit staging copy): 123.9 GiB for the 7B shape; the memory check counts 2 more, measured
(src/train/memory_check.py).

    python -m bench.seven_b_offload --gpu_gib 24 --steps 3
    python -m bench.seven_b_offload --gpu_gib 24 --steps 3 --strategy offload       # ours: 14 bytes per parameter
    python -m bench.seven_b_offload --load_model RWKV-4-Pile-7B.pth
    python -m bench.seven_b_offload --n_layer 32 --n_embd 2560      # a smaller model (2.7B) where the host is small
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import GIB, HostMemorySampler, StepTimes, cap_gpu_memory, peak_gib, pinned_host_peak_gib
from bench.long_context import make_random_base, random_base_path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50277
TIMELINE_KEY = "machine used | PSS of the training process + of its helper processes (count)"


def fine_tune_flags(weights: str, tokens: Path, proj_dir: Path, args) -> list:
    """train.sh's fine-tuning settings (LOAD_MODEL set) for this model and a few steps of random tokens."""
    return ["--load_model", weights, "--data_type", "numpy", "--data_file", str(tokens), "--vocab_size", str(VOCAB),
            "--proj_dir", str(proj_dir), "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd),
            "--ctx_len", str(args.ctx_len), "--ctx_parts", "4", "--micro_bsz", "1", "--grad_cp", "1",
            "--precision", "bf16", "--strategy", args.strategy, "--accelerator", "gpu", "--devices", "1",
            "--accumulate_grad_batches", str(args.accumulate),
            "--epoch_steps", str(args.steps * args.accumulate), "--epoch_count", "1", "--epoch_save", "0",
            "--lr_init", "1e-5",
            "--lr_final", "1e-5", "--enable_progress_bar", "0", "--random_seed", "0"]


def run_child(args) -> int:
    """The training, in its own process: cap the card, train, print a RESULT line."""
    import train
    from src.train import memory_check
    from src.config import parse_args
    from src.errors import UserInputError

    filler = cap_gpu_memory(args.gpu_gib)
    proj_dir = Path(tempfile.mkdtemp(prefix="rwkv-offload-"))
    tokens = proj_dir / "tokens.npy"
    samples = args.steps * args.accumulate + 2
    np.save(tokens, np.random.default_rng(0).integers(0, VOCAB, args.ctx_len * samples, dtype=np.int32))
    cfg = parse_args(fine_tune_flags(args.load_model, tokens, proj_dir, args))
    estimate = memory_check.run_need(cfg, VOCAB, world_size=1, processes_per_host=1, on_gpu=True)
    timer = StepTimes()
    try:
        code = train.train(cfg, [timer], write_weights=False)
    except UserInputError as e:  # the memory check: this machine cannot hold the run
        print(f"train.py: error: {e}", flush=True)
        code = 2
    allocated, reserved = peak_gib(filler)
    steps = timer.report(warmup=1, timed=None)  # the median after the first optimizer step
    rows = [line.split("\t") for line in (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]] \
        if (proj_dir / "train_steps.tsv").exists() else []
    print("RESULT " + json.dumps({
        "exit": code, "losses": [float(r[2]) for r in rows], "peak_allocated_gib": allocated,
        "peak_reserved_gib": reserved, "seconds_per_step": steps.median if steps.seconds else None,
        "pinned_gib": pinned_host_peak_gib(), "estimate_gpu_gib": estimate.gpu / GIB,
        "estimate_host_gib": estimate.host / GIB}), flush=True)
    return code


def memory_check_refusal(args) -> str:
    """train.py's memory check of this run on this machine (the card as capped, the host as it is now), or ''."""
    from src.train import memory_check
    from src.config import parse_args
    from src.errors import UserInputError

    cfg = parse_args(fine_tune_flags(args.load_model or "base.pth", Path("tokens.npy"), Path("out"), args))
    need = memory_check.run_need(cfg, VOCAB, world_size=1, processes_per_host=1, on_gpu=True)
    try:
        memory_check.check_fits(cfg, need, int(args.gpu_gib * GIB), memory_check.available_host_memory())
    except UserInputError as e:
        return str(e)
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load_model", default="", help="bf16 .pth to fine-tune (default: random, written once)")
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory cap in GiB")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to train")
    parser.add_argument("--ctx_len", type=int, default=4096)
    parser.add_argument("--n_layer", type=int, default=32, help="a smaller model where the host cannot hold 7B")
    parser.add_argument("--n_embd", type=int, default=4096)
    parser.add_argument("--strategy", default="deepspeed_stage_2_offload",
                        choices=("deepspeed_stage_2_offload", "offload"),
                        help="DeepSpeed's ZeRO-2 offload (the fork's), or ours (src/optim/host_offload.py)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    refusal = memory_check_refusal(args)
    if refusal:  # before a 15 GB base is written: the run cannot fit this machine
        print(f"train.py: error: {refusal}\nRESULT " + json.dumps({"exit": 2, "refused": refusal}))
        return 2
    if not args.load_model:
        args.load_model = str(random_base_path(args.n_layer, args.n_embd))
        if not Path(args.load_model).exists():
            started = time.time()
            make_random_base(Path(args.load_model), args.n_layer, args.n_embd)
            print(f"random base written to {args.load_model} in {time.time() - started:.0f} s", flush=True)
            torch.cuda.empty_cache()
    command = [sys.executable, "-m", "bench.seven_b_offload", "--child", *sys.argv[1:], "--load_model", args.load_model]
    started = time.time()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with HostMemorySampler(child.pid) as host:
        output = child.stdout.read()
        code = child.wait()
    wall = time.time() - started
    found = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not found:
        print(output[-4000:])
        print(f"exit {code}; host memory over time (GiB: {TIMELINE_KEY}): {host.timeline_text()}")
        print(f"host memory of the process tree by kind (PSS GiB), {host.breakdown_text()}")
        return code or 1
    result = json.loads(found[0][len("RESULT "):])
    result.update({k + "_gib": v / GIB for k, v in host.peak.items()}, wall_s=wall)
    print(output[-2500:])
    print("RESULT " + json.dumps(result))
    steps = len(result["losses"])
    print("\n| what | measured | memory check's estimate |\n|---|---|---|")
    print(f"| card | {torch.cuda.get_device_name(0)}, capped at {args.gpu_gib:g} GiB | |")
    print(f"| model | L{args.n_layer} D{args.n_embd} vocab {VOCAB}, ctx {args.ctx_len}, bf16, "
          f"{args.strategy}, accumulation {args.accumulate}, grad_cp, ctx_parts 4, --load_model {args.load_model} | |")
    print(f"| exit code; optimizer steps | {result['exit']}; {steps} (losses "
          f"{', '.join(f'{x:.3f}' for x in result['losses'])}) | |")
    print(f"| peak GPU allocated / reserved | {result['peak_allocated_gib']:.2f} / "
          f"{result['peak_reserved_gib']:.2f} GiB "
          f"| {result['estimate_gpu_gib']:.2f} GiB (weights, gradients, optimizer) |")
    print(f"| peak host memory: process tree RSS / PSS | {result['rss_gib']:.1f} / {result['pss_gib']:.1f} GiB "
          f"| {result['estimate_host_gib']:.1f} GiB |")
    print(f"| of which pinned by torch (page-locked, in both) | {result['pinned_gib']:.1f} GiB | |")
    print(f"| of which its helper processes (compiler workers), PSS | {result['helpers_pss_gib']:.1f} GiB "
          f"| |")
    print(f"| peak host memory in use on the machine (MemTotal - MemAvailable) | "
          f"{result['machine_used_gib']:.1f} GiB | |")
    if result["seconds_per_step"]:
        print(f"| seconds per optimizer step (median after the first) | {result['seconds_per_step']:.1f} | |")
    print(f"| wall time including start-up | {wall:.0f} s | |")
    print(f"\nhost memory over time (GiB: {TIMELINE_KEY}): {host.timeline_text()}")
    print(f"host memory of the process tree by kind (PSS GiB), {host.breakdown_text()}")
    return result["exit"]


if __name__ == "__main__":
    sys.exit(main())
