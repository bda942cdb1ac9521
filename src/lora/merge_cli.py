"""The command line of merge_lora.py and merge_lora_plus.py (the latter adds --layer_filter):

    PROG [--use-gpu] [--overwrite] [--layer_filter SPEC] [lora_alpha] base_model lora_checkpoint output

Exit code 0 when the checked merge is written, 2 for bad input (nothing written then), 130 / 143 after Ctrl+C /
SIGTERM (nothing written either: the output appears whole or not at all).
"""
import argparse
import math

import torch

from src import cli
from src.io.atomic import check_output_file
from src.io.checkpoint import load_weights, save_weights
from src.errors import UserInputError
from src.lora.merge import LoraCheckpoint, merge_checked, resolve_alpha
from src.layer_spec import format_layers, parse_layer_spec


def build_parser(prog: str, description: str, layer_filter: bool) -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=prog, description=description,
                                usage=f"{prog} [-h] [--use-gpu] [--overwrite]"
                                      f"{' [--layer_filter SPEC]' if layer_filter else ''} "
                                      f"[lora_alpha] base_model lora_checkpoint output")
    parser.add_argument("--use-gpu", action="store_true", help="Compute the merge and its check on the GPU.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the output file if it exists (without it, an existing output is refused).")
    if layer_filter:
        parser.add_argument("--layer_filter", default=None,
                            help="Layers to merge, each with an optional coefficient for its LoRA update, e.g. "
                                 "'25-31' or '0.5*0-15 1*16-31'. Unlisted layers keep the base weights (their "
                                 "time/ln values too); coefficients do not scale time/ln values.")
    parser.add_argument("paths", nargs="+", metavar="[lora_alpha] base_model lora_checkpoint output",
                        help="lora_alpha may be left out when the LoRA file stores it (files of this toolkit).")
    return parser


def run(argv, prog: str, description: str, layer_filter: bool) -> int:
    """Parse `argv` (None = sys.argv[1:]), merge, check, write; returns the exit code."""
    args = build_parser(prog, description, layer_filter).parse_args(argv)
    return cli.run_main(prog, lambda: merge(args, prog, layer_filter),
                        interrupted="{prog}: {signal}: stopped; nothing was written")


def merge(args, prog: str, layer_filter: bool) -> int:
    """The merge of the parsed command line `args`; returns 0 once the checked merge is written."""
    with cli.signals_interrupt():  # SIGTERM too deletes the output being written
        alpha, base_path, lora_path, out_path = split_positionals(args.paths)
        layer_coef = None
        if layer_filter and args.layer_filter is not None:
            layer_coef = parse_layer_spec(args.layer_filter, what="--layer_filter", coefficients=True)
        device = pick_device(args.use_gpu)
        found = check_output_file(out_path, args.overwrite, "the output", "--overwrite",
                                  inputs=[("the base model", base_path), ("the LoRA checkpoint", lora_path)])
        base = load_weights(base_path, what="base model")
        lora = LoraCheckpoint.from_weights(load_weights(lora_path, what="LoRA checkpoint"), lora_path)
        alpha = resolve_alpha(alpha, lora)
        merged, report = merge_checked(base, lora, alpha, layer_coef, device, base_path)
        save_weights(merged, out_path, replace=found)  # only what the check found: never one written meanwhile
    source = "stored in the LoRA file" if lora.settings is not None else "from the command line"
    layers = "" if layer_coef is None else f" (layers {format_layers(layer_coef)})"
    print(f"{prog}: merged {report.merged} LoRA pairs and {report.replaced} time/ln tensors{layers} with alpha "
          f"{report.alpha:g} {source}; check on the merged model: max |logit difference| {report.max_diff:.2e} "
          f"(tolerance {report.tolerance:.2e}); wrote {out_path} ({len(merged)} tensors in the base's dtypes)")
    return 0


def split_positionals(paths: list) -> tuple:
    """[alpha,] base, lora, output -> (alpha or None, base, lora, output)."""
    if len(paths) == 3:
        return (None, *paths)
    if len(paths) == 4:
        try:
            alpha = float(paths[0])
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise UserInputError(f"lora_alpha must be a positive number (got {paths[0]!r}); usage: [lora_alpha] "
                                 f"base_model lora_checkpoint output.")
        return (alpha, *paths[1:])
    raise UserInputError(f"expected [lora_alpha] base_model lora_checkpoint output, got {len(paths)} arguments.")


def pick_device(use_gpu: bool) -> str:
    if use_gpu and not torch.cuda.is_available():
        raise UserInputError("--use-gpu: no CUDA device is available; run without --use-gpu to merge on the CPU.")
    return "cuda" if use_gpu else "cpu"
