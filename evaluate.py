"""The loss of an RWKV model (RWKV-4 or RWKV-7) on held-out data: in total, by position in the window, as a table and as JSON.

    python evaluate.py --load_model out/rwkv-final.pth --data_type binidx --data_file data/valid_text_document \\
        --ctx_len 4096 --precision bf16
    python evaluate.py --load_model RWKV-4-Pile-7B.pth --lora_load out/rwkv-final.pth ... --ctx_len 131072 \\
        --ctx_parts 32 --state_cp 1

The data is cut into consecutive windows of --ctx_len inputs, each evaluated from an empty state
(src/eval/windows.py, src/eval/engine.py). The last line of stdout is one JSON object: loss, perplexity, tokens,
loss_by_position ([[start, end, loss], ...]), windows, input_tokens, seconds, tokens_per_s.
A result that cannot be right is refused instead: no target left by the masks, a NaN or infinite loss.
Exit code 0 when done, 2 for bad input (one line on stderr), 130 / 143 after Ctrl+C / SIGTERM (one line).
"""
import argparse
import dataclasses
import json
import math
import sys
import time

from src import cli
from src.config import TrainConfig, add_flags
from src.data.types import CHARACTER_DATA_TYPES
from src.errors import UserInputError
from src.models import family_of_model

PROG = "evaluate.py"
PROGRESS_EVERY_S = 10.0  # seconds between progress lines on stderr
MAX_TOKENS = 2 ** 62  # the largest --max_tokens: beyond it numpy's int64 overflows (train.py's count flags have theirs)


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags that mean the same here come from TrainConfig (config.add_flags), with their help; the
    flags declared here are evaluate.py's own, or mean something else than train.py's flag of that name."""
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=cli.FlagHelpFormatter)
    group = parser.add_argument_group("model")
    # train.py's --load_model, --lora_load and --lora_alpha start a training; here they give the model evaluated
    group.add_argument("--load_model", required=True,
                       help="The .pth to evaluate: a file train.py wrote, or a released RWKV-4 (Pile, Raven, "
                            "World) or RWKV-7 (World, G1); its family and shape are read from its weights.")
    group.add_argument("--lora_load", default="", help="A LoRA checkpoint to apply on top of --load_model (its base).")
    group.add_argument("--lora_alpha", type=float, default=None,
                       help="The alpha of a --lora_load file of the original toolkit (files of this toolkit store it).")
    group = parser.add_argument_group("data")
    add_flags(group, ["data_file", "data_type"])
    # the vocabulary is the model's here: 0 and the character vocab.json mean that, not one built from the text
    group.add_argument("--vocab_size", type=int, default=0,
                       help="Vocabulary size of token data; 0 = the model's (a different value is refused).")
    group.add_argument("--vocab_file", default="",
                       help="jsonl: the tokenizer of the text (as train.py's). Character-level data (utf-8, utf-16le, "
                            "dummy): the vocab.json of the model's run (default: the one beside --load_model).")
    add_flags(group, ["my_sample_len", "select_name", "my_script_mask"])
    group.add_argument("--max_tokens", type=int, default=0,
                       help="Evaluate the first N tokens of the data only (0 = all of it).")
    group = parser.add_argument_group("windows")
    add_flags(group, ["ctx_len", "ctx_parts", "state_cp", "micro_bsz"])
    parser.set_defaults(micro_bsz=1)  # evaluate.py's own default: one window at a time (train.py's is 12)
    group = parser.add_argument_group("hardware")
    add_flags(group, ["precision", "accelerator", "wkv_backend", "compile"])
    return parser


def main(argv=None) -> int:
    def body():
        with cli.signals_interrupt():  # Ctrl+C and SIGTERM stop it with one line
            return report(evaluate(build_parser().parse_args(argv)))

    return cli.run_main(PROG, body, interrupted="{prog}: {signal}: stopped; no result")


def report(result) -> int:
    """Prints the EvalResult's table and, as the last line, its JSON summary; exit code 0."""
    print(result.table())
    print(json.dumps(result.summary(), allow_nan=False), flush=True)
    return 0


def evaluate(args: argparse.Namespace):
    """The EvalResult of the parsed command line; prints a heading line first."""
    if not 0 <= args.max_tokens <= MAX_TOKENS:
        raise UserInputError(f"--max_tokens {args.max_tokens} must be in [0, {MAX_TOKENS}].")
    data_flags = {name: getattr(args, name) for name in (
        "data_file", "data_type", "vocab_size", "my_sample_len", "select_name", "my_script_mask", "ctx_len",
        "ctx_parts", "state_cp", "micro_bsz", "precision", "accelerator", "wkv_backend", "compile")}
    char_level = args.data_type in CHARACTER_DATA_TYPES
    # train.py's checks of these flags (data types, masks, ranges); the model's shape comes from its file
    cfg = TrainConfig(**data_flags, vocab_file="" if char_level else args.vocab_file).finalize()

    import torch  # after the command line is known to be valid

    from src.eval import engine, model_loader
    from src.data.dataset import DataFile
    from src.eval.windows import load_windows

    from src.train import strategy

    device = torch.device(strategy.training_device(cfg))
    check_device_flags(args, device)
    strategy.check_fused_kernels(cfg)
    dtype = strategy.SAVE_DTYPE[cfg.precision]  # the weights' dtype: what a run of this precision saves
    strategy.set_float_precision(cfg)
    model = model_loader.load_model(args.load_model, args.lora_load, args.lora_alpha, device, dtype,
                                  flags=cfg)
    windowed = family_of_model(model).windowed_features(model.cfg)  # the shape answers as the flags would
    if args.state_cp and windowed:
        raise UserInputError(f"--state_cp 1: {args.load_model} has {windowed[0]}, which attends "
                             f"over the whole window at once and cannot continue from a state; leave --state_cp out")
    if args.vocab_size and args.vocab_size != model.cfg.vocab_size:
        raise UserInputError(f"--vocab_size {args.vocab_size} differs from the vocabulary of {args.load_model} "
                             f"({model.cfg.vocab_size}); leave --vocab_size out")
    cfg = dataclasses.replace(cfg, vocab_size=model.cfg.vocab_size)
    if args.data_type == "jsonl":
        model_loader.check_tokenizer_fits(args.vocab_file, model.cfg.vocab_size, args.load_model)
    chars = model_loader.characters_of(args.load_model, args.vocab_file) if char_level else None
    if chars is not None and len(chars) != model.cfg.vocab_size:
        raise UserInputError(f"the character vocabulary ({args.vocab_file or 'vocab.json beside --load_model'}) has "
                             f"{len(chars)} characters and {args.load_model} a vocabulary of {model.cfg.vocab_size}: "
                             f"it is not the vocab.json of the run that trained the model; pass that one with "
                             f"--vocab_file")
    windows = load_windows(DataFile.from_flags(cfg), args.max_tokens, chars)
    if not windows.has_a_target():
        raise UserInputError(f"{windows.source}: the masks ({masks_of(args)}) leave no target in any of its "
                             f"{len(windows):,} windows of --ctx_len {args.ctx_len}, so there is no loss to "
                             f"compute; change the mask or give other data")
    print(f"{PROG}: {args.load_model}{f' + {args.lora_load}' if args.lora_load else ''} on {windows.source} "
          f"({args.data_type}): {len(windows):,} windows of up to {args.ctx_len:,} tokens"
          f"{f' in segments of {cfg.segment_len:,}' if cfg.segment_len else ''}, {cfg.precision} on {device}",
          flush=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        result = engine.evaluate(model, windows, cfg.ctx_len, cfg.micro_bsz, cfg.segment_len, device=device,
                                     progress=ProgressLines())
    if not result.tokens:
        raise UserInputError(f"no target was evaluated ({masks_of(args)}); there is no loss to report")
    if not math.isfinite(result.loss):
        raise UserInputError(f"the loss of {args.load_model} on {windows.source} is {result.loss}: the model computes "
                             f"non-finite logits (weights with NaN or infinity, or values beyond the range of "
                             f"--precision {args.precision}); no result to report")
    return result


def check_device_flags(args: argparse.Namespace, device) -> None:
    """Refuse flags that need a GPU when the evaluation runs on the CPU, as train.py refuses them: fp16 (no run
    trains in it on a CPU) and the CUDA kernel."""
    import torch

    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--accelerator {args.accelerator}: torch sees no CUDA GPU here; use --accelerator cpu "
                             f"(or auto)")
    if device.type == "cuda":
        return
    if args.precision == "fp16":
        raise UserInputError(f"--precision fp16 needs a CUDA GPU, and this evaluation runs on {device} (--accelerator "
                             f"{args.accelerator}); use --precision bf16 or fp32")
    if args.wkv_backend == "cuda":
        raise UserInputError(f"--wkv_backend cuda is the GPU kernel, and this evaluation runs on {device} "
                             f"(--accelerator {args.accelerator}); use --wkv_backend auto or torch")


def masks_of(args) -> str:
    """The flags that mask targets, as given ("--my_script_mask 0_16"), or what masks without a flag."""
    given = [f"--{name} {getattr(args, name)}" for name in ("my_script_mask", "select_name") if getattr(args, name)]
    return ", ".join(given) or "the data's own"


class ProgressLines:
    """engine.evaluate's progress callback: a line on stderr at most every PROGRESS_EVERY_S seconds."""

    def __init__(self):
        self.started = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S and done < total:
            self.last = now
            print(f"{done:,} / {total:,} windows, {now - self.started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    cli.exit_process(main())
