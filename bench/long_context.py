"""Long-context LoRA training of the 7B shape: peak GPU memory and tokens/s from 4K to 1M tokens, in 24 GiB.

The fork's long-context recipe through our train.py (data loader, LoRA, DeepSpeed, the optimizer step
included): L32 D4096 vocab 50277 with random weights, bf16, LoRA r16 alpha 32 on att,ffn,time,ln,
--grad_cp 1 --state_cp 1, segments of 4096 tokens (--ctx_parts ctx_len / 4096), one sample per step,
--strategy deepspeed_stage_1 (the fork's train_world.sh). Each length trains in a process of its own on a
card made to look like a 24 GiB one: a filler allocation leaves 24 GiB free (DeepSpeed sizes buffers
from free memory) and the allocator is capped at filler + 24 GiB. Peak memory is reported without the
filler. tokens/s is the median over the steps after the first (with one step, that step).

The table puts each figure beside the original toolkit's on the same card model (the fork's own code,
measured by this project on one H200 on 2026-12-01) and beside the hardware limit: the matmul work of a
step at the bf16 matmul rate measured in this run. With frozen weights (LoRA) a token costs 6 N FLOPs,
N = 7.2e9 non-embedding parameters: the forward that fills the stores, each block's recompute, and the
backward, which only propagates through frozen weights (src/train/state_cp/engine.py); a segment whose block inputs did
not fit in host memory adds a forward.

    python -m bench.long_context                          # 4096 32768 131072 1048576
    python -m bench.long_context --lengths 4096 131072
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import StepTimes, cap_gpu_memory, matmul_tflops, peak_gib, run_child

SEGMENT = 4096
SHAPE = dict(n_layer=32, n_embd=4096, vocab_size=50277)
NON_EMBEDDING_PARAMS = 32 * 13 * 4096 ** 2 + 4096 * 50277  # blocks + head
# the fork's own code on one H200, measured by this project on 2026-12-01: ctx -> (tokens/s, peak GiB)
ORIGINAL = {4096: (7614, 17.33), 32768: (6008, 17.34), 131072: (5709, 17.39)}
STEPS = {4096: 6, 32768: 3, 131072: 2, 1048576: 1}


def lora_flags(weights: Path, tokens: Path, proj_dir: Path, ctx_len: int, steps: int) -> list:
    return ["--load_model", str(weights), "--data_type", "numpy", "--data_file", str(tokens), "--vocab_size", "50277",
            "--n_layer", "32", "--n_embd", "4096", "--ctx_len", str(ctx_len), "--ctx_parts", str(ctx_len // SEGMENT),
            "--state_cp", "1", "--grad_cp", "1", "--micro_bsz", "1", "--epoch_steps", str(steps), "--epoch_count", "1",
            "--epoch_save", "0", "--lr_init", "1e-4", "--lr_final", "1e-4", "--precision", "bf16",
            "--strategy", "deepspeed_stage_1", "--accelerator", "gpu", "--devices", "1", "--lora", "--lora_r", "16",
            "--lora_alpha", "32", "--lora_dropout", "0.01", "--lora_parts", "att,ffn,time,ln",
            "--enable_progress_bar", "0", "--random_seed", "0", "--proj_dir", str(proj_dir)]


def random_base_path(n_layer: int = SHAPE["n_layer"], n_embd: int = SHAPE["n_embd"]) -> Path:
    """Where the benchmarks keep the random base of a shape between runs (written once, in the temporary folder)."""
    return Path(tempfile.gettempdir()) / f"rwkv-L{n_layer}-D{n_embd}-random-bf16.pth"


def ensure_random_base(path: Path) -> Path:
    """`path`, written as a random 7B base first if it does not exist yet."""
    if not path.exists():
        started = time.time()
        make_random_base(path)
        print(f"random 7B base written to {path} in {time.time() - started:.0f} s", flush=True)
    return path


def make_random_base(path: Path, n_layer: int = SHAPE["n_layer"], n_embd: int = SHAPE["n_embd"]) -> None:
    """A model of the 7B shape (or another depth and width) with the v4neo init (made on the GPU), saved in bf16 as
    a released model would be."""
    from src.io.checkpoint import save_weights
    from src.models.rwkv4.config import RWKVConfig
    from src.models.rwkv4.model import RWKV, generate_init_weights

    with torch.device("cuda"):
        model = RWKV(RWKVConfig(vocab_size=SHAPE["vocab_size"], n_layer=n_layer, n_embd=n_embd))
    save_weights(generate_init_weights(model, 1e-4, device="cuda", dtype=torch.bfloat16), path)
    del model
    torch.cuda.empty_cache()


def random_tokens(ctx_len: int, folder: Path) -> Path:
    """A .npy of random token ids, two samples long, in `folder`."""
    tokens = folder / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 50277, 2 * ctx_len + 1, dtype=np.int32))
    return tokens


def run_one_length(args) -> int:
    """Child process: cap the card, train `STEPS` steps at one length, print a RESULT line."""
    import train
    from src.config import parse_args

    filler = cap_gpu_memory(args.gpu_gib)
    proj_dir = Path(tempfile.mkdtemp(prefix=f"long{args.ctx_len}-"))
    tokens = random_tokens(args.ctx_len, proj_dir)
    steps = STEPS.get(args.ctx_len, 2)
    timer = StepTimes()
    code = train.train(parse_args(lora_flags(Path(args.weights), tokens, proj_dir, args.ctx_len, steps)), [timer],
                       write_weights=False)
    rows = [r.split("\t") for r in (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]]
    allocated, reserved = peak_gib(filler)
    print("RESULT " + json.dumps({
        "ctx_len": args.ctx_len, "exit": code, "steps": len(timer.ends) - 1,
        "tokens_per_s": args.ctx_len / timer.steady_seconds(), "peak_allocated_gib": allocated,
        "peak_reserved_gib": reserved, "losses": [float(r[2]) for r in rows]}), flush=True)
    return code


def run_each_length(module: str, args, extra_argv: tuple = ()) -> tuple:
    """The parent's part of a 7B benchmark: the random base made once (unless --weights), the matmul rate, then
    `python -m module --ctx_len L ...` in a process of its own for each of args.lengths.
    Returns (TFLOP/s, the children's RESULT dicts, failed ones left out)."""
    weights = ensure_random_base(Path(args.weights or random_base_path()))
    tflops = matmul_tflops()
    results = []
    for ctx_len in args.lengths:
        result = run_child(module, ["--ctx_len", str(ctx_len), "--weights", str(weights), "--gpu_gib",
                                    str(args.gpu_gib), *extra_argv], f"ctx {ctx_len}")
        if result:
            results.append(result)
    return tflops, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072, 1048576])
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory cap in GiB")
    parser.add_argument("--weights", default="", help="7B .pth to train LoRA on (default: random, made once)")
    parser.add_argument("--ctx_len", type=int, help=argparse.SUPPRESS)  # child process: one length
    args = parser.parse_args()
    if args.ctx_len:
        return run_one_length(args)

    tflops, results = run_each_length("bench.long_context", args)
    limit = tflops * 1e12 / (6 * NON_EMBEDDING_PARAMS)
    print(f"\n{torch.cuda.get_device_name(0)}, capped at {args.gpu_gib:g} GiB; bf16 matmul {tflops:.0f} TFLOP/s "
          f"(8192^3), so the matmul limit of a --state_cp LoRA step is {limit:,.0f} tokens/s")
    print("\n| ctx_len | steps | ours tokens/s | original tokens/s | ours / original | of the limit "
          "| ours peak allocated / reserved GiB | original peak GiB | losses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        original_speed, original_peak = ORIGINAL.get(r["ctx_len"], (None, None))
        ratio = f"{r['tokens_per_s'] / original_speed:.2f}x" if original_speed else "-"
        print(f"| {r['ctx_len']:,} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
              f"{f'{original_speed:,}' if original_speed else '-'} | {ratio} | {r['tokens_per_s'] / limit:.0%} | "
              f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} | {original_peak or '-'} | "
              f"{', '.join(f'{loss:.3f}' for loss in r['losses'])} |")
    return 0 if len(results) == len(args.lengths) else 1


if __name__ == "__main__":
    sys.exit(main())
