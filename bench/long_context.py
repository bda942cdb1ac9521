"""Long-context LoRA training of the 7B shape: peak GPU memory and tokens/s from 4K to 1M tokens, in 24 GiB.

The fork's long-context recipe through our train.py (data loader, LoRA, DeepSpeed, the optimizer step
included): L32 D4096 vocab 50277 with random weights, bf16, LoRA r16 alpha 32 on att,ffn,time,ln,
--grad_cp 1 --state_cp 1, segments of 4096 tokens (--ctx_parts ctx_len / 4096), one sample per step,
--strategy deepspeed_stage_1 (the fork's train_world.sh). Each length trains in a process of its own on a
card made to look like a 24 GiB one: a filler allocation leaves 24 GiB free (DeepSpeed sizes buffers
from free memory) and the allocator is capped at filler + 24 GiB. Peak memory is reported without the
filler. tokens/s is the median over the steps after the first (with one step, that step), timed as
bench.train_throughput times them (bench/common.py StepTimes); every step's time is printed under the table.

The table puts each figure beside the original toolkit's on the same card model (the fork's own code,
measured by this project on one H200 on 2026-12-01) and beside the hardware limit: the matmul work of a
step at the bf16 matmul rate measured in this run. With frozen weights (LoRA) a token costs 6 N FLOPs,
N = 7.2e9 non-embedding parameters: the forward that fills the stores, each block's recompute, and the
backward, which only propagates through frozen weights (src/train/state_cp/engine.py); a segment whose block inputs did
not fit in host memory adds a forward.

`--model x070` runs the same recipe on RWKV-7 (--my_testing x070, head size 64, vocab 65536, its CUDA WKV-7 kernel;
default shape L32 D2560, the 2.9B), from a random base made by the family's own initialisation; N counts its
matrices the same way. It has no original figures; its goals (issue 33) are printed under the table.

    python -m bench.long_context                          # 4096 32768 131072 1048576
    python -m bench.long_context --lengths 4096 131072
    python -m bench.long_context --model x070 --n_layer 32 --n_embd 2560 --lengths 4096 131072
"""
import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench.common import StepReport, StepTimes, cap_gpu_memory, matmul_tflops, peak_gib, run_child

SEGMENT = 4096
SHAPE = dict(n_layer=32, n_embd=4096, vocab_size=50277)
NON_EMBEDDING_PARAMS = 32 * 13 * 4096 ** 2 + 4096 * 50277  # blocks + head (= matrix_params(MODELS["rwkv4"], 32, 4096))
# the fork's own code on one H200, measured by this project on 2026-12-01: ctx -> (tokens/s, peak GiB)
ORIGINAL = {4096: (7614, 17.33), 32768: (6008, 17.34), 131072: (5709, 17.39)}
STEPS = {4096: 6, 32768: 3, 131072: 2, 1048576: 1}


@dataclasses.dataclass(frozen=True)
class Goals:
    """What a model's run must show: its peak allocated GiB at every length, and the tokens/s at the longest length
    over the tokens/s at the shortest."""
    peak_gib: float
    speed_ratio: float


@dataclasses.dataclass(frozen=True)
class LongContextModel:
    """A model family's long-context run: its default shape and the train.py flags that pick it."""
    title: str
    base_name: str  # the random base's file name starts with it
    n_layer: int
    n_embd: int
    vocab_size: int
    family_flags: tuple = ()  # train.py flags that pick the family and the rest of its shape
    kernel_flags: tuple = ()  # train.py flags of the training run only (the kernel it must use)
    original: dict = dataclasses.field(default_factory=dict)  # ctx_len -> (tokens/s, peak GiB) of the original
    goals: Optional[Goals] = None


MODELS = {
    "rwkv4": LongContextModel("RWKV-4", "rwkv", SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["vocab_size"],
                              original=ORIGINAL),
    # the CUDA kernel named: a failed build stops the run instead of timing the plain-torch twin
    "x070": LongContextModel("RWKV-7", "rwkv-x070", 32, 2560, 65536, ("--my_testing", "x070", "--head_size", "64"),
                             ("--wkv_backend", "cuda"), goals=Goals(peak_gib=16.0, speed_ratio=0.9)),
}


def shape_flags(model: LongContextModel, n_layer: int, n_embd: int) -> list:
    """train.py's flags for the model's shape and family."""
    return ["--vocab_size", str(model.vocab_size), "--n_layer", str(n_layer), "--n_embd", str(n_embd),
            *model.family_flags]


def lora_flags(weights: Path, tokens: Path, proj_dir: Path, ctx_len: int, steps: int,
               model: LongContextModel = MODELS["rwkv4"], n_layer: int = SHAPE["n_layer"],
               n_embd: int = SHAPE["n_embd"]) -> list:
    return ["--load_model", str(weights), "--data_type", "numpy", "--data_file", str(tokens),
            *shape_flags(model, n_layer, n_embd), *model.kernel_flags,
            "--ctx_len", str(ctx_len), "--ctx_parts", str(ctx_len // SEGMENT),
            "--state_cp", "1", "--grad_cp", "1", "--micro_bsz", "1", "--epoch_steps", str(steps), "--epoch_count", "1",
            "--epoch_save", "0", "--lr_init", "1e-4", "--lr_final", "1e-4", "--precision", "bf16",
            "--strategy", "deepspeed_stage_1", "--accelerator", "gpu", "--devices", "1", "--lora", "--lora_r", "16",
            "--lora_alpha", "32", "--lora_dropout", "0.01", "--lora_parts", "att,ffn,time,ln",
            "--enable_progress_bar", "0", "--random_seed", "0", "--proj_dir", str(proj_dir)]


def random_base_path(n_layer: int = SHAPE["n_layer"], n_embd: int = SHAPE["n_embd"],
                     model: LongContextModel = MODELS["rwkv4"]) -> Path:
    """Where the benchmarks keep the random base of a shape between runs (written once, in the temporary folder)."""
    return Path(tempfile.gettempdir()) / f"{model.base_name}-L{n_layer}-D{n_embd}-random-bf16.pth"


def ensure_random_base(path: Path, n_layer: int = SHAPE["n_layer"], n_embd: int = SHAPE["n_embd"],
                       model: LongContextModel = MODELS["rwkv4"]) -> Path:
    """`path`, written as a random base of the model's shape first if it does not exist yet."""
    if not path.exists():
        started = time.time()
        make_random_base(path, n_layer, n_embd, model)
        print(f"random {model.title} L{n_layer} D{n_embd} base written to {path} in {time.time() - started:.0f} s",
              flush=True)
    return path


def build_from_scratch(model: LongContextModel, n_layer: int, n_embd: int):
    """(the family's record, its model) as train.py builds them from scratch for these flags, on the current default
    device (the data flags only satisfy the parser: nothing is read)."""
    from src.config import parse_args

    cfg = parse_args([*shape_flags(model, n_layer, n_embd), "--data_type", "dummy"])
    return cfg.family, cfg.family.build(cfg.family.shape_from_flags(cfg, model.vocab_size))


def make_random_base(path: Path, n_layer: int = SHAPE["n_layer"], n_embd: int = SHAPE["n_embd"],
                     model: LongContextModel = MODELS["rwkv4"], device: str = "cuda") -> None:
    """A model of the shape with its family's initialisation for a run from scratch (RWKV-4: the v4neo init; RWKV-7:
    BlinkDL's), made on `device` and saved in bf16 as a released model would be."""
    from src.io.checkpoint import save_weights

    with torch.device(device):
        family, built = build_from_scratch(model, n_layer, n_embd)
    save_weights(family.init_weights(built, 1e-4, device=device, dtype=torch.bfloat16), path)
    del built
    if device != "cpu":
        torch.cuda.empty_cache()


def matrix_params(model: LongContextModel, n_layer: int, n_embd: int) -> int:
    """N of the 6 N FLOPs a token: the parameters of the matrices (two or more dimensions once squeezed) but the
    embedding, which is a lookup. RWKV-4: 13 C^2 a block + the head; RWKV-7: 12 C^2 a block, its low-rank
    matrices and r_k, and the head."""
    from src.models import EMBEDDING

    with torch.device("meta"):  # shapes only
        family, built = build_from_scratch(model, n_layer, n_embd)
    return sum(p.numel() for name, p in built.named_parameters()
               if family.piece_of(name) != EMBEDDING and len([d for d in p.shape if d != 1]) >= 2)


def random_tokens(ctx_len: int, folder: Path, vocab_size: int = SHAPE["vocab_size"]) -> Path:
    """A .npy of random token ids, two samples long, in `folder`."""
    tokens = folder / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, vocab_size, 2 * ctx_len + 1, dtype=np.int32))
    return tokens


def run_one_length(args) -> int:
    """Child process: cap the card, train `STEPS` steps at one length, print a RESULT line."""
    import train
    from src.config import parse_args

    model = MODELS[args.model]
    filler = cap_gpu_memory(args.gpu_gib)
    proj_dir = Path(tempfile.mkdtemp(prefix=f"long{args.ctx_len}-"))
    tokens = random_tokens(args.ctx_len, proj_dir, model.vocab_size)
    steps = STEPS.get(args.ctx_len, 2)
    timer = StepTimes()
    flags = lora_flags(Path(args.weights), tokens, proj_dir, args.ctx_len, steps, model, args.n_layer, args.n_embd)
    code = train.train(parse_args(flags), [timer], write_weights=False)
    rows = [r.split("\t") for r in (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]]
    allocated, reserved = peak_gib(filler)
    step_report = timer.report(warmup=1, timed=None)
    print("RESULT " + json.dumps({
        "ctx_len": args.ctx_len, "exit": code, "steps": len(step_report.seconds),
        "tokens_per_s": args.ctx_len / step_report.median, "step_times": step_report.as_dict(),
        "peak_allocated_gib": allocated, "peak_reserved_gib": reserved, "losses": [float(r[2]) for r in rows]}),
        flush=True)
    return code


def run_each_length(module: str, args, extra_argv: tuple = (), weights: Optional[Path] = None) -> tuple:
    """The parent's part of a long-context benchmark: the random base made once (unless --weights or `weights`), the
    matmul rate, then `python -m module --ctx_len L ...` in a process of its own for each of args.lengths.
    Returns (TFLOP/s, the children's RESULT dicts, failed ones left out)."""
    weights = weights or ensure_random_base(Path(args.weights or random_base_path()))
    tflops = matmul_tflops()
    results = []
    for ctx_len in args.lengths:
        result = run_child(module, ["--ctx_len", str(ctx_len), "--weights", str(weights), "--gpu_gib",
                                    str(args.gpu_gib), *extra_argv], f"ctx {ctx_len}")
        if result:
            results.append(result)
    return tflops, results


def goal_lines(goals: Goals, results: list) -> list:
    """Each goal with what the run measured and whether it is met; the speed ratio needs two lengths."""
    peak = max(r["peak_allocated_gib"] for r in results)
    lines = [f"goal: peak allocated <= {goals.peak_gib:g} GiB at every length: {peak:.2f} GiB at most, "
             f"{'met' if peak <= goals.peak_gib else 'MISSED'}"]
    shortest, longest = min(results, key=lambda r: r["ctx_len"]), max(results, key=lambda r: r["ctx_len"])
    if longest is not shortest:
        ratio = longest["tokens_per_s"] / shortest["tokens_per_s"]
        lines.append(f"goal: tokens/s at {longest['ctx_len']:,} / tokens/s at {shortest['ctx_len']:,} >= "
                     f"{goals.speed_ratio:g}: {ratio:.2f}, {'met' if ratio >= goals.speed_ratio else 'MISSED'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072, 1048576])
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory cap in GiB")
    parser.add_argument("--weights", default="", help="base .pth to train LoRA on (default: random, made once)")
    parser.add_argument("--model", choices=list(MODELS), default="rwkv4",
                        help="rwkv4 (default: the 7B shape) or x070 (RWKV-7: the 2.9B shape, vocab 65536, head 64)")
    parser.add_argument("--n_layer", type=int, help="default: the model's (32)")
    parser.add_argument("--n_embd", type=int, help="default: the model's (rwkv4 4096, x070 2560)")
    parser.add_argument("--ctx_len", type=int, help=argparse.SUPPRESS)  # child process: one length
    args = parser.parse_args()
    model = MODELS[args.model]
    args.n_layer, args.n_embd = args.n_layer or model.n_layer, args.n_embd or model.n_embd
    if args.ctx_len:
        return run_one_length(args)

    weights = Path(args.weights or random_base_path(args.n_layer, args.n_embd, model))
    ensure_random_base(weights, args.n_layer, args.n_embd, model)
    tflops, results = run_each_length("bench.long_context", args, ("--model", args.model, "--n_layer",
                                      str(args.n_layer), "--n_embd", str(args.n_embd)), weights)
    limit = tflops * 1e12 / (6 * matrix_params(model, args.n_layer, args.n_embd))
    print(f"\n{torch.cuda.get_device_name(0)}, capped at {args.gpu_gib:g} GiB; bf16 matmul {tflops:.0f} TFLOP/s "
          f"(8192^3), so the matmul limit of a --state_cp LoRA step is {limit:,.0f} tokens/s")
    print(f"model: {model.title} L{args.n_layer} D{args.n_embd} vocab {model.vocab_size}")
    print("\n| ctx_len | steps | ours tokens/s | original tokens/s | ours / original | of the limit "
          "| ours peak allocated / reserved GiB | original peak GiB | losses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        original_speed, original_peak = model.original.get(r["ctx_len"], (None, None))
        ratio = f"{r['tokens_per_s'] / original_speed:.2f}x" if original_speed else "-"
        print(f"| {r['ctx_len']:,} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
              f"{f'{original_speed:,}' if original_speed else '-'} | {ratio} | {r['tokens_per_s'] / limit:.0%} | "
              f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} | {original_peak or '-'} | "
              f"{', '.join(f'{loss:.3f}' for loss in r['losses'])} |")
    for r in results:
        print(f"\nctx_len {r['ctx_len']:,}:\n" + "\n".join(StepReport(**r["step_times"]).lines()))
    if model.goals and results:
        print("\n" + "\n".join(goal_lines(model.goals, results)))
    return 0 if len(results) == len(args.lengths) else 1


if __name__ == "__main__":
    sys.exit(main())
