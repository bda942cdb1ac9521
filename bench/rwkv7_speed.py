"""RWKV-7 training speed: our model beside BlinkDL's own training model and kernels, forward + backward, in one process.

For each shape (L12 D768 and L32 D2560, the 2.9B; vocab 65536, head size 64), ctx 4096 and micro batch B, with
bf16 weights (as DeepSpeed's bf16 and our master-weight optimizer hold them): the loss of B random samples and
its backward, no optimizer step. The same tokens for every row; CUDA events around each step, --warmup steps
first, then the median of --steps; peak memory is the allocator's peak over the timed steps (weights, gradients,
activations). Rows:
- ours: the model train.py builds from scratch for --my_testing x070 (the family's build and initialisation, its
  forward options from the same flags: --wkv_backend, --grad_cp, --compile), and its training loss (model.loss:
  cross-entropy with L2Wrap, a chunk of tokens at a time);
- BlinkDL: RWKV-v7/train_temp/src/model.py with its CUDA kernels (staged by bench/stage_blinkdl_v7.sh), built with
  the arguments and environment his train.py gives it (--kernel @rwkv3 as his demo-training-run.sh, --head_chunk
  0: the logits, then his fused L2Wrap cross-entropy kernel), its training_step as the loss;
- limit: 6 N FLOPs a token (N: the parameters of the non-embedding matrices, forward 2 N, backward 4 N) at the
  bf16 matmul rate measured in this run.

His model.py compiles about eight CUDA extensions at import, one after another; to spare device time this
benchmark builds them first in parallel processes (the arguments of each `load` call recorded by running his
model.py once with `load` only recording), while our kernels build on a one-layer model, then imports his model.py,
whose `load` calls find the builds done.

    bench/stage_blinkdl_v7.sh            # once, here: .blinkdl_v7/ (git-excluded), carried to the GPU machine
    python -m bench.rwkv7_speed
    python -m bench.rwkv7_speed --shapes L12-D768 --micro_bsz 1 8 --blinkdl_dir ''   # ours only
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from bench.common import GIB, matmul_tflops, print_run_header
from bench.long_context import MODELS, matrix_params, shape_flags
from src.config import parse_args

RWKV7 = MODELS["x070"]  # vocab 65536, head size 64
SHAPES = {"L12-D768": (12, 768), "L32-D2560": (32, 2560)}  # name -> (n_layer, n_embd)
BLINKDL_MODULE = "blinkdl_rwkv7_model"
# a child process building one of his extensions from its recorded `load` arguments (JSON)
BUILD_ONE = "import json, sys; from torch.utils.cpp_extension import load; load(**json.loads(sys.argv[1]))"


# ---------------------------------------------------------------- ours


def our_flags(n_layer: int, n_embd: int, micro_bsz: int, args) -> list:
    """train.py's flags of this run (the data flags only satisfy the parser: nothing is read)."""
    return [*shape_flags(RWKV7, n_layer, n_embd), "--data_type", "dummy", "--ctx_len", str(args.ctx_len),
            "--micro_bsz", str(micro_bsz), "--grad_cp", str(args.grad_cp), "--precision", "bf16",
            "--wkv_backend", args.wkv_backend, "--compile", str(args.compile)]


def our_model(flags: list):
    """(model, loss function) as train.py builds and trains it from scratch, on the GPU in bf16."""
    cfg = parse_args(flags)
    family = cfg.family
    with torch.device("cuda"):
        model = family.build(family.shape_from_flags(cfg, RWKV7.vocab_size), family.forward_options(cfg))
    model.load_state_dict(family.init_weights(model, cfg.lr_init, device="cuda", dtype=torch.bfloat16))
    model = model.to(torch.bfloat16).train()
    return model, model.loss


# ---------------------------------------------------------------- BlinkDL's


def blinkdl_environment(args) -> dict:
    """The environment his model.py reads at import, as his train.py sets it for a bf16 run of this length."""
    return {"RWKV_MY_TESTING": "x070", "RWKV_KERNEL": args.blinkdl_kernel, "RWKV_CTXLEN": str(args.ctx_len),
            "RWKV_HEAD_SIZE": "64", "RWKV_HEAD_L2WRAP_CE_CHUNK": "0", "RWKV_FLOAT_MODE": "bf16",
            "RWKV_JIT_ON": str(args.blinkdl_jit)}


def lightning_for_blinkdl() -> None:
    """His model.py imports pytorch_lightning; where only the `lightning` package is installed, lightning.pytorch
    (the same classes) stands in for it."""
    if importlib.util.find_spec("pytorch_lightning") is None:
        import lightning.pytorch as pl

        sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": pl.utilities,
                            "pytorch_lightning.strategies": pl.strategies})


def run_blinkdl_model_py(folder: Path, name: str):
    """Execute his src/model.py as module `name`, from `folder` (his `load` calls name "cuda/..." relatively)."""
    spec = importlib.util.spec_from_file_location(name, folder / "src" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with contextlib.chdir(folder):
        spec.loader.exec_module(module)
    return module


def blinkdl_extension_loads(folder: Path) -> list:
    """The keyword arguments of each torch.utils.cpp_extension.load call his model.py makes at import: found by running
    it once with `load` recording them instead of building, and with the two calls that need a built operator
    (torch.library.register_autograd, torch.jit.script) doing nothing."""
    for dependency in ("pytorch_lightning.utilities", "pytorch_lightning.strategies", "deepspeed.ops.adam"):
        if importlib.util.find_spec(dependency.split(".")[0]):  # imported first, with torch as it is
            importlib.import_module(dependency)
    calls = []

    def record(*positional, **keywords):
        assert not positional, "his load calls name every argument"
        calls.append(keywords)

    with mock.patch("torch.utils.cpp_extension.load", record), \
            mock.patch("torch.library.register_autograd", lambda *a, **k: None), \
            mock.patch("torch.jit.script", lambda fn, *a, **k: fn):
        run_blinkdl_model_py(folder, BLINKDL_MODULE + "_recording")
    del sys.modules[BLINKDL_MODULE + "_recording"]
    return calls


def start_blinkdl_builds(folder: Path) -> list:
    """Each of his extensions building in a process of its own, into torch's extension cache:
    [(name, process, its output file)]."""
    builds = []
    for call in blinkdl_extension_loads(folder):
        log = tempfile.TemporaryFile(mode="w+")
        builds.append((call["name"], subprocess.Popen([sys.executable, "-c", BUILD_ONE, json.dumps(call)],
                                                      cwd=folder, stdout=log, stderr=subprocess.STDOUT), log))
    return builds


def finish_blinkdl_builds(builds: list) -> None:
    for name, process, log in builds:
        if process.wait() != 0:
            log.seek(0)
            raise RuntimeError(f"BlinkDL's extension {name} did not build:\n{log.read()[-3000:]}")
        log.close()


def blinkdl_args(n_layer: int, n_embd: int, ctx_len: int, grad_cp: int) -> SimpleNamespace:
    """Every field of his train.py's args that his RWKV, Block, RWKV_Tmix_x070 and RWKV_CMix_x070 read (his
    channel-mix is 4 n_embd wide whatever dim_ffn says; his train.py's default dim_ffn passes his checks)."""
    return SimpleNamespace(n_layer=n_layer, n_embd=n_embd, dim_att=n_embd, dim_ffn=int((n_embd * 3.5) // 32 * 32),
                           vocab_size=RWKV7.vocab_size, head_size=64, ctx_len=ctx_len, grad_cp=grad_cp,
                           my_testing="x070")


def blinkdl_model(module, n_layer: int, n_embd: int, args):
    """(his model on the GPU in bf16, its training_step as the loss function)."""
    with torch.device("cuda"):
        model = module.RWKV(blinkdl_args(n_layer, n_embd, args.ctx_len, args.grad_cp))
    model = model.to(torch.bfloat16).train()
    return model, lambda idx, targets: model.training_step((idx, targets), 0)


# ---------------------------------------------------------------- timing


def random_batch(micro_bsz: int, ctx_len: int):
    """(idx, targets), each (B, T) on the GPU: B random samples of T + 1 tokens, the same for every row."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, RWKV7.vocab_size, (micro_bsz, ctx_len + 1), device="cuda", generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def measure(model, loss_fn, batch, warmup: int, steps: int) -> dict:
    """Forward + loss + backward of `batch`, gradients dropped before each step: the median milliseconds of `steps`
    steps after `warmup`, the peak GiB over them, and the last loss."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(*batch)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / GIB, "loss": loss.item()}


def run_row(row: str, build, batch, args) -> dict:
    """Build one model, time it, free it: the result ({"oom": True} where it does not fit the card)."""
    model = loss_fn = None
    try:
        model, loss_fn = build()
        result = measure(model, loss_fn, batch, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        result = {"oom": True}
    model = loss_fn = None  # the model and its gradients go before the next row's model comes
    gc.collect()
    torch.cuda.empty_cache()
    print(f"{row}: {json.dumps(result)}", flush=True)
    return result


# ---------------------------------------------------------------- the table


def table_lines(results: list, tflops: float, ctx_len: int) -> list:
    """The markdown table: per shape and micro batch, ours, BlinkDL's and the limit. `results` holds dicts with
    shape, micro_bsz, row ("ours" / "BlinkDL") and measure's keys (or oom)."""
    def line(*cells) -> str:
        return "| " + " | ".join(str(cell) for cell in cells) + " |"

    lines = [line("shape", "micro_bsz", "model", "ms / step", "tokens/s", "ours / BlinkDL", "of the limit",
                  "peak GiB", "loss"), line(*["---"] * 9)]
    groups = dict.fromkeys((r["shape"], r["micro_bsz"]) for r in results)
    for shape, micro_bsz in groups:
        tokens = micro_bsz * ctx_len
        limit = tflops * 1e12 / (6 * matrix_params(RWKV7, *SHAPES[shape]))
        rows = {r["row"]: r for r in results if (r["shape"], r["micro_bsz"]) == (shape, micro_bsz)}
        speed = {row: tokens / r["ms"] * 1000 for row, r in rows.items() if not r.get("oom")}
        ratio = f"{speed['ours'] / speed['BlinkDL']:.2f}x" if {"ours", "BlinkDL"} <= set(speed) else "-"
        for row, r in rows.items():
            if r.get("oom"):
                lines.append(line(shape, micro_bsz, row, "out of memory", "", "", "", "", ""))
            else:
                lines.append(line(shape, micro_bsz, row, f"{r['ms']:.1f}", f"{speed[row]:,.0f}",
                                  ratio if row == "ours" else "", f"{speed[row] / limit:.0%}",
                                  f"{r['peak_gib']:.1f}", f"{r['loss']:.3f}"))
        lines.append(line(shape, micro_bsz, "limit", f"{tokens / limit * 1000:.1f}", f"{limit:,.0f}", "", "100%",
                          "", ""))
    return lines


# ---------------------------------------------------------------- main


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--micro_bsz", type=int, nargs="+", default=[1], help="micro batch sizes to time")
    parser.add_argument("--ctx_len", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (their median)")
    parser.add_argument("--grad_cp", type=int, default=0, choices=(0, 1), help="both models recompute each block")
    parser.add_argument("--wkv_backend", default="cuda", choices=("cuda", "auto", "torch"),
                        help="ours: train.py's --wkv_backend (cuda: a failed kernel build stops the run)")
    parser.add_argument("--compile", type=int, default=1, choices=(0, 1), help="ours: train.py's --compile")
    parser.add_argument("--blinkdl_dir", default=".blinkdl_v7",
                        help="his staged model.py and cuda/ (bench/stage_blinkdl_v7.sh); '' times ours only")
    parser.add_argument("--blinkdl_kernel", default="@rwkv3",
                        help="his --kernel: @rwkv3 (his demo's, faster on H100) or '' (rwkv7_clampw)")
    parser.add_argument("--blinkdl_jit", type=int, default=1, choices=(0, 1),
                        help="his RWKV_JIT_ON (1: as his train.py sets it)")
    return parser.parse_args(argv)


def build_our_kernels(args) -> None:
    """One step of a one-layer model: our CUDA kernels build (or load from torch's cache) on first use."""
    run_row("ours, a one-layer model (its kernels build)", lambda: our_model(our_flags(1, 128, 1, args)),
            random_batch(1, 64), SimpleNamespace(warmup=0, steps=1))


def prepare(args):
    """Our kernels built while his extensions build, then his model.py imported: his module (None without
    --blinkdl_dir)."""
    if not args.blinkdl_dir:
        build_our_kernels(args)
        return None
    folder = Path(args.blinkdl_dir).resolve()
    if not (folder / "src" / "model.py").exists():
        raise SystemExit(f"{folder}/src/model.py is missing: run bench/stage_blinkdl_v7.sh first")
    os.environ.update(blinkdl_environment(args))  # his code's configuration, read at its import
    lightning_for_blinkdl()
    builds = start_blinkdl_builds(folder)
    build_our_kernels(args)
    finish_blinkdl_builds(builds)
    module = run_blinkdl_model_py(folder, BLINKDL_MODULE)
    print(f"BlinkDL/RWKV-LM {(folder / 'COMMIT').read_text().strip()}, kernel {args.blinkdl_kernel or 'default'}, "
          f"JIT {args.blinkdl_jit}", flush=True)
    return module


def main(argv=None) -> int:
    args = parse(argv)
    print_run_header("bench.rwkv7_speed", argv)
    blinkdl = prepare(args)
    tflops = matmul_tflops()
    results = []
    for shape in args.shapes:
        n_layer, n_embd = SHAPES[shape]
        for micro_bsz in args.micro_bsz:
            batch = random_batch(micro_bsz, args.ctx_len)
            builds = {"ours": lambda: our_model(our_flags(n_layer, n_embd, micro_bsz, args))}
            if blinkdl:
                builds["BlinkDL"] = lambda: blinkdl_model(blinkdl, n_layer, n_embd, args)
            for row, build in builds.items():
                result = run_row(f"{shape} B{micro_bsz} {row}", build, batch, args)
                results.append({"shape": shape, "micro_bsz": micro_bsz, "row": row, **result})
    print(f"\nvocab {RWKV7.vocab_size}, head size 64, ctx {args.ctx_len}, bf16 weights, grad_cp {args.grad_cp}; "
          f"forward + loss + backward, median of {args.steps} steps after {args.warmup}; bf16 matmul "
          f"{tflops:.0f} TFLOP/s (8192^3)\n")
    print("\n".join(table_lines(results, tflops, args.ctx_len)))
    return 0 if not any(r.get("oom") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
