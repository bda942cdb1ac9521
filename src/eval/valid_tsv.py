"""valid.tsv in --proj_dir: a row per held-out evaluation of a run (src/train/held_out.py writes, plot_run.py reads).

Columns (tab-separated, a header line first): epoch (the mini-epoch after which it ran, as in rwkv-<epoch>.pth),
step (the run's optimizer step, as in train_steps.tsv), loss, perplexity, tokens (targets counted), seconds,
loss_by_position (JSON [[start, end, loss or null], ...], src/eval/engine.py). Rows are appended line by line,
so every run in the folder adds its own, and a row is whole once written.
No torch import: plotting a run does not load it.
"""
import json
from pathlib import Path

from src.errors import UserInputError

VALID_LOG_NAME = "valid.tsv"
VALID_LOG_COLUMNS = ("epoch", "step", "loss", "perplexity", "tokens", "seconds", "loss_by_position")


def append_row(proj_dir, epoch: int, step: int, summary: dict) -> None:
    """Append a held-out evaluation's summary (EvalResult.summary()) as a row; the header first into a new file."""
    path = Path(proj_dir) / VALID_LOG_NAME
    curve = [[start, end, None if loss is None else round(loss, 6)] for start, end, loss in summary["loss_by_position"]]
    row = (epoch, step, f"{summary['loss']:.8f}", f"{summary['perplexity']:.6f}", summary["tokens"],
           f"{summary['seconds']:.3f}", json.dumps(curve, separators=(",", ":")))
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write("\t".join(VALID_LOG_COLUMNS) + "\n")
        f.write("\t".join(str(value) for value in row) + "\n")
        f.flush()


def read_rows(proj_dir) -> list:
    """Every row of proj_dir/valid.tsv as a dict with typed values ([] when there is no such file); a file that is
    not one train.py wrote is refused in one line naming its line (see read_table)."""
    path = Path(proj_dir) / VALID_LOG_NAME
    if not path.exists():
        return []
    parsers = {"epoch": count, "step": count, "loss": number, "perplexity": number, "tokens": count,
               "seconds": number, "loss_by_position": position_curve}
    return [{column: parse(row[column], path, line_no, column) for column, parse in parsers.items()}
            for line_no, row in read_table(path, VALID_LOG_COLUMNS)]


# ---------------------------------------------------------------- the run's logs read back: valid.tsv, train_steps.tsv

LARGEST_COUNT = 2 ** 62  # steps, epochs, tokens and positions beyond this are not a run's


def read_table(path, columns) -> list:
    """[(line number, {column: text})] of a tab-separated log with a header line that names at least `columns`.
    Refused in one line naming the file (and the line): unreadable, not UTF-8, no such header, a row with another
    number of fields than the header. An empty file has no rows (train.py takes it as a new log); a last line
    without its newline is a row being appended right now (or one cut off): it is left out."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserInputError(f"{path} is not a file; it should be the log that train.py appends to.")
        data = path.read_bytes()
    except OSError as e:
        raise UserInputError(f"{path} cannot be read ({e.strerror}).")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data[:e.start].count(b"\n") + 1
        raise UserInputError(f"{path}:{line_no}: not UTF-8 text; it is not a log train.py wrote (damaged or "
                             f"replaced?).") from None
    if not text:
        return []
    lines = text.split("\n")
    header = lines[0].split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserInputError(f"{path}: its first line {_shown(lines[0])} is not a header with the column"
                             f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}; it is not a log train.py wrote "
                             f"(damaged or replaced?).")
    rows = []
    for line_no, line in enumerate(lines[1:-1], start=2):  # lines[-1]: the text after the last newline
        fields = line.split("\t")
        if len(fields) != len(header):
            raise UserInputError(f"{path}:{line_no}: {len(fields)} fields where the header names {len(header)} "
                                 f"({_shown(line)}); the file is damaged.")
        rows.append((line_no, dict(zip(header, fields))))
    return rows


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def count(text: str, path, line_no: int, column: str) -> int:
    """A whole number 0..LARGEST_COUNT from a log field, or a one-line refusal naming the place."""
    try:
        value = int(text)
    except ValueError:
        raise UserInputError(f"{path}:{line_no}: {column} is {_shown(text)}, not a whole number; the file is "
                             f"damaged.") from None
    if not 0 <= value <= LARGEST_COUNT:
        raise UserInputError(f"{path}:{line_no}: {column} is {_shown(text)}, outside 0..2**62; the file is damaged.")
    return value


def number(text: str, path, line_no: int, column: str) -> float:
    """A float from a log field (nan and inf included: a run that diverged logs them), or a one-line refusal."""
    try:
        return float(text)
    except ValueError:
        raise UserInputError(f"{path}:{line_no}: {column} is {_shown(text)}, not a number; the file is "
                             f"damaged.") from None


def position_curve(text: str, path, line_no: int, column: str) -> list:
    """loss_by_position: JSON [[start, end, loss or null], ...] with 0 <= start < end, or a one-line refusal."""
    def refuse(why: str):
        return UserInputError(f"{path}:{line_no}: {column} {_shown(text)} {why}; the file is damaged.")

    try:
        curve = json.loads(text)
    except ValueError as e:  # JSONDecodeError, and numbers too large for a float
        raise refuse(f"is not JSON ({e.args[0].split(':')[0]})") from None
    if not isinstance(curve, list):
        raise refuse("is not a list of [start, end, loss]")
    for bucket in curve:
        if not (isinstance(bucket, list) and len(bucket) == 3):
            raise refuse("is not a list of [start, end, loss]")
        start, end, loss = bucket
        if not all(type(b) is int for b in (start, end)) or not 0 <= start < end <= LARGEST_COUNT:
            raise refuse(f"has the bucket {_shown(str(bucket))}, whose positions are not 0 <= start < end <= 2**62")
        if loss is not None and type(loss) not in (int, float):
            raise refuse(f"has the bucket {_shown(str(bucket))}, whose loss is not a number")
    return curve
