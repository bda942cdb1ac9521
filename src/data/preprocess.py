"""JSONL documents -> binidx, as gpt-neox's preprocess_data.py writes it, in parallel and byte for byte.

The input is cut into blocks of whole lines (about BLOCK_BYTES each) that do not depend on the number of
workers; each block is parsed and tokenized by `BlockEncoder` (in this process, or in a worker process)
and the blocks are written in input order. So any number of workers writes the same bytes.

Per document and key, as gpt-neox: one item of the document's tokens (+ the EOD id with append_eod), then
the end of the document. Documents that tokenize to nothing are skipped and counted (gpt-neox dropped
empty strings and crashed on other empty documents with --append-eod).
"""
import contextlib
import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from src.io.atomic import check_output_file, disk_full_error, is_disk_full
from src.data.binidx import MMapIndexedDatasetBuilder, token_dtype
from src.errors import UserInputError
from src.data.jsonl_lines import (UTF8_BOM, BadLine, check_input_file, open_input, parse_record,
                                  read_errors)
from src.data.tokenizer import Tokenizer, TokenizerSpec

BLOCK_BYTES = 1 << 20
COMPRESSED_SUFFIXES = (".zst", ".gz")
EXAMPLES_KEPT = 3  # messages of skipped lines kept for the summary


@dataclass(frozen=True)
class EncodeOptions:
    """Everything a worker needs to turn a block of lines into tokens."""
    tokenizer: TokenizerSpec
    keys: tuple
    append_eod: bool = False
    ftfy: bool = False
    skip_bad: bool = False


@dataclass
class Block:
    source: str  # input file, for messages
    first_line: int  # 1-based line number of the block's first line
    data: bytes  # whole lines


@dataclass
class EncodedBlock:
    tokens: dict  # key -> all documents' tokens, concatenated (output dtype)
    sizes: dict  # key -> int32 tokens per document
    empty: Counter  # key -> documents skipped because they tokenized to nothing
    skipped: Counter  # reason -> lines skipped with --skip-bad
    examples: list  # first messages of skipped lines
    input_bytes: int


def output_prefix_for(prefix: str, key: str) -> str:
    """gpt-neox's naming: train.py's --data_file is `{prefix}_text_document`."""
    return f"{prefix}_{key}_document"


def check_inputs(paths) -> list:
    """Input paths that exist and are JSONL (plain or compressed); anything else is refused here."""
    checked = []
    for text in paths:
        path = Path(text)
        stem = path.name.lower()
        for suffix in COMPRESSED_SUFFIXES:
            stem = stem.removesuffix(suffix)
        if not stem.endswith((".jsonl", ".json")):
            raise UserInputError(f"--input {path}: expected JSON lines (.jsonl, .jsonl.zst or .jsonl.gz)")
        check_input_file("--input", path, "the JSON lines files in it, comma-separated")
        checked.append(path)
    if not checked:
        raise UserInputError("--input is empty; pass one or more comma-separated .jsonl files")
    return checked


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def input_blocks(paths, block_bytes: int = BLOCK_BYTES) -> int:
    """About how many blocks read_blocks cuts the inputs into, at most: their sizes in blocks (a compressed input
    counted at 20 times its size, more than text usually shrinks), at least 1."""
    size = sum(path.stat().st_size * (20 if path.name.lower().endswith(COMPRESSED_SUFFIXES) else 1)
               for path in map(Path, paths))
    return max(1, -(-size // block_bytes))


def capped_workers(workers: int, inputs, block_bytes: int = BLOCK_BYTES) -> tuple:
    """(the workers worth starting for `inputs`, a note when that is fewer than `workers`, else ""): no more than
    the inputs' blocks (a worker tokenizes a block at a time) and the cores (a worker uses one)."""
    blocks, cores = input_blocks(check_inputs([str(path) for path in inputs if str(path)]), block_bytes), usable_cores()
    capped = max(1, min(workers, blocks, cores))
    if capped == workers:
        return workers, ""
    reasons = [f"the input is about {blocks:,} block{'s' * (blocks != 1)} of {block_bytes // 2**20} MiB, which a "
               f"worker tokenizes one at a time"] if blocks < workers else []
    reasons += [f"this machine gives this process {cores} core{'s' * (cores != 1)}"] if cores < workers else []
    return capped, f"Note: --workers {workers} lowered to {capped}: {' and '.join(reasons)}."


def read_blocks(paths, block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """Whole-line blocks of every input, in order."""
    for path in paths:
        line = 1
        try:
            with open_input(path) as stream:
                while True:
                    data = stream.read(block_bytes)
                    if not data:
                        break
                    if not data.endswith(b"\n"):
                        data += stream.readline()  # finish the last line
                    yield Block(str(path), line, data)
                    line += data.count(b"\n")
        except read_errors() as e:
            raise UserInputError(f"--input {path} cannot be read ({type(e).__name__}: {e})")


class BlockEncoder:
    """Parses and tokenizes blocks; one per process."""

    def __init__(self, options: EncodeOptions, tokenizer: Optional[Tokenizer] = None):
        self.options = options
        self.tokenizer = tokenizer or options.tokenizer.build()
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        if options.ftfy:
            import ftfy

            self.fix_text = ftfy.fix_text
        else:
            self.fix_text = None

    def __call__(self, block: Block) -> EncodedBlock:
        keys = self.options.keys
        texts = {key: [] for key in keys}  # key -> the block's documents, in order
        skipped, examples = Counter(), []
        for index, raw in enumerate(block.data.split(b"\n")):
            if not raw.strip():
                continue  # blank lines (and the end of the block) hold no document
            if block.first_line + index == 1:
                raw = raw.removeprefix(UTF8_BOM)
            try:
                record = parse_record(raw, f"{block.source}:{block.first_line + index}", keys,
                                      choosing_keys="choose the text field with --jsonl-keys")
            except BadLine as bad:
                if not self.options.skip_bad:
                    raise UserInputError(f"{bad} (or pass --skip-bad to skip such lines)")
                skipped[bad.reason] += 1
                if len(examples) < EXAMPLES_KEPT:
                    examples.append(str(bad))
                continue
            for key in keys:
                texts[key].append(self.fix_text(record[key]) if self.fix_text else record[key])
        tokens, sizes, empty = {}, {}, Counter()
        for key in keys:
            documents = [ids for ids in self.tokenizer.encode_batch(texts[key]) if ids]
            empty[key] = len(texts[key]) - len(documents)
            if self.options.append_eod:
                for ids in documents:
                    ids.append(self.tokenizer.eod_id)
            sizes[key] = np.fromiter(map(len, documents), np.int32, count=len(documents))
            tokens[key] = (np.concatenate([np.array(ids, dtype=self.dtype) for ids in documents]) if documents
                           else np.zeros(0, self.dtype))
        return EncodedBlock(tokens, sizes, +empty, skipped, examples, len(block.data))


_worker_encoder = None


def _start_worker(options: EncodeOptions) -> None:
    """Worker initializer: Ctrl+C is the main process's to handle; a failure is reported with the first block.
    (SIGTERM stays the default: it is how the pool ends its workers.)"""
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # one tokenizing thread per worker, so that --workers N uses N cores: the `tokenizers` library takes this
    # switch only from the environment of the process that tokenizes
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        _worker_encoder = BlockEncoder(options)
    except Exception as e:  # raising here would make the pool restart the worker forever
        _worker_encoder = e if isinstance(e, UserInputError) else UserInputError(f"a worker failed to start: {e!r}")


def _encode_in_worker(block: Block) -> EncodedBlock:
    if isinstance(_worker_encoder, Exception):
        raise _worker_encoder
    return _worker_encoder(block)


def _start_pool(workers: int, options: EncodeOptions):
    """The worker processes, spawned (they start clean: no copied threads or locks), with /dev/null as their stderr:
    they report through the pool's results, and Ctrl+C, which the terminal sends to them too, made a worker that was
    still importing print a KeyboardInterrupt traceback (once started, they ignore it: the main process stops them)."""
    stderr = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        return multiprocessing.get_context("spawn").Pool(workers, _start_worker, (options,))
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)


def encoded_blocks(blocks: Iterator[Block], options: EncodeOptions, workers: int,
                   tokenizer: Tokenizer) -> Iterator[EncodedBlock]:
    """Encoded blocks in input order; with workers > 1, up to 2 * workers blocks are in flight."""
    if workers == 1:
        encoder = BlockEncoder(options, tokenizer)
        yield from map(encoder, blocks)
        return
    with _start_pool(workers, options) as pool:
        pending = deque()
        for block in blocks:
            pending.append(pool.apply_async(_encode_in_worker, (block,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class Totals:
    keys: tuple
    tokenizer: str = ""
    vocab_size: int = 0
    dtype: np.dtype = np.dtype(np.uint16)  # of the written tokens
    documents: Counter = field(default_factory=Counter)  # key -> documents written
    tokens: Counter = field(default_factory=Counter)
    empty: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    input_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, block: EncodedBlock) -> None:
        for key in self.keys:
            self.documents[key] += len(block.sizes[key])
            self.tokens[key] += len(block.tokens[key])
        self.empty.update(block.empty)
        self.skipped.update(block.skipped)
        self.examples.extend(block.examples[:EXAMPLES_KEPT - len(self.examples)])
        self.input_bytes += block.input_bytes

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def rates(self) -> str:
        key = self.keys[0]
        return (f"{self.documents[key] / self.seconds:,.0f} docs/s, {self.tokens[key] / self.seconds:,.0f} tokens/s, "
                f"{self.input_bytes / self.seconds / 2**20:.1f} MB/s")


class Progress:
    """A one-line progress bar on a terminal (a line per update otherwise): every `interval` documents, and
    at most once per `min_seconds` (default: 0.2 s on a terminal, 10 s in a log file)."""

    def __init__(self, stream, interval: int, total_documents: Optional[int], min_seconds: Optional[float] = None):
        self.stream = stream
        self.interval = interval
        self.total = total_documents
        self.next_report = interval
        self.redraw = stream.isatty()
        self.min_seconds = (0.2 if self.redraw else 10.0) if min_seconds is None else min_seconds
        self.last_report = -float("inf")

    def update(self, totals: Totals) -> None:
        done = totals.documents[totals.keys[0]]
        now = time.perf_counter()
        if done < self.next_report or now - self.last_report < self.min_seconds:
            return
        self.next_report = (done // self.interval + 1) * self.interval
        self.last_report = now
        count = f"{done:,}/{self.total:,} ({100 * done / self.total:.0f}%)" if self.total else f"{done:,}"
        line = f"{count} documents, {totals.tokens[totals.keys[0]]:,} tokens | {totals.rates()}"
        print(f"\r{line}\x1b[K" if self.redraw else line, end="" if self.redraw else "\n", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.redraw and self.next_report > self.interval:
            print(file=self.stream, flush=True)


def preprocess(options: EncodeOptions, inputs, output_prefix: str, workers: int = 1, progress: Progress = None,
               block_bytes: int = BLOCK_BYTES, replace: bool = False) -> Totals:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.bin/.idx` for each key; returns the totals.

    Outputs that exist are refused before any work unless `replace`, and so are outputs that are inputs. The outputs
    appear only if everything succeeded, over what the check found only; on any error or stop the partial files are
    removed, and a full disk is one line.
    """
    paths = check_inputs([str(path) for path in inputs if str(path)])
    found = check_outputs(output_prefix, options, replace, [("--input", path) for path in paths])
    tokenizer = options.tokenizer.build()  # here first: a bad tokenizer fails before any worker starts
    if options.append_eod and tokenizer.eod_id is None:
        raise UserInputError(f"--append-eod: the {tokenizer.name} vocabulary has no {'<|endoftext|>'} token")
    dtype = token_dtype(tokenizer.vocab_size)
    builders = {key: MMapIndexedDatasetBuilder(output_prefix_for(output_prefix, key), dtype) for key in options.keys}
    totals = Totals(options.keys, tokenizer.name, tokenizer.vocab_size, np.dtype(dtype))
    try:
        # closed on the way out: a pool's workers end before the partial outputs are removed
        with contextlib.closing(encoded_blocks(read_blocks(paths, block_bytes), options, workers, tokenizer)) as blocks:
            for block in blocks:
                for key, builder in builders.items():
                    builder.add_documents(block.tokens[key], block.sizes[key])
                totals.add(block)
                if progress:
                    progress.update(totals)
        if progress:
            progress.close()
        for key in options.keys:
            if totals.documents[key] == 0:
                raise UserInputError(f"no documents with text under {key!r} in {', '.join(map(str, paths))} "
                                     f"({_skip_summary(totals) or 'the input is empty'}); nothing was written")
        for key, builder in builders.items():
            builder.finalize(replace=found[key])
    except BaseException as e:
        for builder in builders.values():
            builder.abort()
        if is_disk_full(e):  # the outputs need at least what was being written when the space ran out
            needed = sum(builder.output_bytes() for builder in builders.values())
            raise disk_full_error(output_prefix_for(output_prefix, options.keys[0]) + ".bin", needed,
                                  lower_bound=True) from e
        raise
    return totals


def check_outputs(output_prefix: str, options: EncodeOptions, replace: bool, inputs: list) -> dict:
    """Before any work: {key: (Found of its .bin, Found of its .idx)}, the outputs checked (see
    atomic.check_output_file), none of them an input (`inputs`, or the tokenizer's files) or inside one."""
    inputs = [*inputs, *options.tokenizer.inputs()]
    return {key: tuple(check_output_file(output_prefix_for(output_prefix, key) + suffix, replace, "the output",
                                         "--overwrite", inputs) for suffix in (".bin", ".idx"))
            for key in options.keys}


def _skip_summary(totals: Totals) -> str:
    parts = [f"{n:,} empty document{'s' * (n != 1)} under {k!r}" for k, n in totals.empty.items()]
    parts += [f"{n:,} line{'s' * (n != 1)} with {reason}" for reason, n in totals.skipped.items()]
    return "skipped " + ", ".join(parts) if parts else ""


def summary(totals: Totals, output_prefix: str, workers: int) -> str:
    lines = [f"{output_prefix_for(output_prefix, key)}.bin/.idx: {totals.documents[key]:,} documents, "
             f"{totals.tokens[key]:,} tokens ({totals.tokenizer}, vocab {totals.vocab_size}, {totals.dtype.name})"
             for key in totals.keys]
    skipped = _skip_summary(totals)
    if skipped:
        lines.append(skipped + (": " + "; ".join(totals.examples) if totals.examples else ""))
    lines.append(f"{totals.seconds:.1f} s with {workers} worker{'s' if workers > 1 else ''}: {totals.rates()}")
    return "\n".join(lines)
