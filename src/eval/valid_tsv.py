"""valid.tsv in --proj_dir: a row per held-out evaluation of a run (src/train/held_out.py writes, plot_run.py reads).

Columns (tab-separated, a header line first): epoch (the mini-epoch after which it ran, as in rwkv-<epoch>.pth),
step (the run's optimizer step, as in train_steps.tsv), loss, perplexity, tokens (targets counted), seconds,
loss_by_position (JSON [[start, end, loss or null], ...], src/eval/engine.py). Rows are appended line by line,
so every run in the folder adds its own, and a row is whole once written.
No torch import: plotting a run does not load it.
"""
import json
from pathlib import Path

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
    """Every row of proj_dir/valid.tsv as a dict with typed values ([] when there is no such file)."""
    path = Path(proj_dir) / VALID_LOG_NAME
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    rows = []
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t")))
        rows.append({"epoch": int(row["epoch"]), "step": int(row["step"]), "loss": float(row["loss"]),
                     "perplexity": float(row["perplexity"]), "tokens": int(row["tokens"]),
                     "seconds": float(row["seconds"]), "loss_by_position": json.loads(row["loss_by_position"])})
    return rows
