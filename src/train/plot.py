"""A run's folder as one picture: training loss (and the held-out loss) and the learning rate by optimizer step,
and the held-out loss by position in the window, from the logs train.py appends to (train_steps.tsv,
valid.tsv). matplotlib draws it without a display (a Figure of its own, no pyplot state).

Runs appended to one folder are drawn one after the other: a run continued by hand (--epoch_begin N+1) counts
its steps from 1 again, so its steps are placed after the previous run's. A held-out evaluation is drawn at
the last step of the mini-epoch after which it ran.
"""
import io
import math
import struct
from pathlib import Path

from src.eval import valid_tsv
from src.io.atomic import atomic_file
from src.errors import UserInputError
from src.io.outputs import STEP_LOG_NAME

PLOT_NAME = "run.png"  # the default picture in the run's folder
SMOOTHING_POINTS = 50  # the training loss is also drawn as a moving average over about 1/50 of the steps
# the PNG's Software text: what tells a picture this tool drew, which it may replace, from any other file
SOFTWARE = "plot_run.py (rwkv-infctx)"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_steps(proj_dir) -> dict:
    """train_steps.tsv as columns {"x": steps placed one run after another, "epoch", "loss", "lr"}; a file train.py
    did not write is refused in one line naming its line (valid_tsv.read_table)."""
    path = Path(proj_dir) / STEP_LOG_NAME
    if not path.exists():
        raise UserInputError(f"{proj_dir} has no {STEP_LOG_NAME}: it is not the --proj_dir of a train.py run")
    columns = {"x": [], "epoch": [], "loss": [], "lr": []}
    previous = 0
    offset = 0
    for line_no, row in valid_tsv.read_table(path, ("step", "epoch", "loss", "lr")):
        step = valid_tsv.count(row["step"], path, line_no, "step")
        if step <= previous:  # a later run in this folder that counts from 1 again
            offset = columns["x"][-1]
        previous = step
        columns["x"].append(step + offset)
        columns["epoch"].append(valid_tsv.count(row["epoch"], path, line_no, "epoch"))
        columns["loss"].append(_drawable(valid_tsv.number(row["loss"], path, line_no, "loss")))
        lr = valid_tsv.number(row["lr"], path, line_no, "lr")
        if not 0 <= lr < math.inf:
            raise UserInputError(f"{path}:{line_no}: lr is {row['lr']!r}, not a learning rate; the file is damaged.")
        columns["lr"].append(lr)
    return columns


def _drawable(value: float) -> float:
    """An infinite loss (a run that diverged) is drawn as a gap, as NaN is."""
    return value if math.isfinite(value) else math.nan


def drawn_by_plot_run(path) -> bool:
    """Whether `path` is a PNG whose Software text says this tool drew it (read up to its image data)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return False
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                body = f.read(length)
                f.seek(4, io.SEEK_CUR)  # the chunk's CRC
                if kind == b"tEXt" and body.partition(b"\0") == (b"Software", b"\0", SOFTWARE.encode("latin-1")):
                    return True
    except OSError:
        return False


def moving_average(values: list, width: int) -> list:
    """Mean of each value and the width - 1 before it (fewer at the start), NaNs (gaps) left out of the means."""
    means, total, counted = [], 0.0, 0
    for i, value in enumerate(values):
        if not math.isnan(value):
            total, counted = total + value, counted + 1
        if i >= width and not math.isnan(values[i - width]):
            total, counted = total - values[i - width], counted - 1
        means.append(total / counted if counted else math.nan)
    return means


def evaluation_steps(steps: dict, rows: list) -> list:
    """The x of each valid.tsv row: the last training step of its mini-epoch (its own step if none is logged)."""
    last_of_epoch = {epoch: x for x, epoch in zip(steps["x"], steps["epoch"])}
    return [last_of_epoch.get(row["epoch"], row["step"]) for row in rows]


def plot_run(proj_dir, out_path, replace=True) -> tuple:
    """Draw the run in proj_dir into the PNG out_path (written whole or not at all; `replace` as atomic.publish's, e.g.
    what the check before the work found there); returns (steps, evaluations)."""
    from matplotlib.figure import Figure

    steps = read_steps(proj_dir)
    rows = valid_tsv.read_rows(proj_dir)
    figure = Figure(figsize=(16, 4.8), layout="constrained")
    loss_axes, lr_axes, position_axes = figure.subplots(1, 3)
    title = f"{Path(proj_dir).resolve().name}: {len(steps['x']):,} optimizer steps"

    loss_axes.plot(steps["x"], steps["loss"], color="tab:blue", alpha=0.35, linewidth=0.8, label="training (per step)")
    if len(steps["x"]) >= 2 * SMOOTHING_POINTS:
        width = len(steps["x"]) // SMOOTHING_POINTS
        loss_axes.plot(steps["x"], moving_average(steps["loss"], width), color="tab:blue",
                       label=f"training (mean of {width} steps)")
    if rows:
        held_out = [_drawable(row["loss"]) for row in rows]
        loss_axes.plot(evaluation_steps(steps, rows), held_out, "o-", color="tab:red", label="held-out (valid.tsv)")
        title += f"; last held-out loss {rows[-1]['loss']:.4f} after mini-epoch {rows[-1]['epoch']}"
    if steps["loss"]:
        title += f"; last training loss {steps['loss'][-1]:.4f}"
    loss_axes.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)

    lr_axes.plot(steps["x"], steps["lr"], color="tab:green")
    lr_axes.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    if steps["lr"] and min(steps["lr"]) > 0:
        lr_axes.set_yscale("log")
    lr_axes.grid(alpha=0.3)

    _draw_positions(position_axes, rows)
    figure.suptitle(title)
    png = io.BytesIO()  # drawn in memory first: the file's size is known for a full disk's message
    figure.savefig(png, format="png", dpi=100, metadata={"Software": SOFTWARE})
    with atomic_file(out_path, size=len(png.getbuffer()), replace=replace) as f:
        f.write(png.getbuffer())
    return len(steps["x"]), len(rows)


def _draw_positions(axes, rows: list) -> None:
    """The last evaluation's loss by position (and the first one's, for comparison): a falling curve is a model
    that uses its context."""
    axes.set(xlabel="position in the window (end of bucket)", ylabel="held-out loss",
             title="held-out loss by position in the window")
    axes.grid(alpha=0.3)
    if not rows:
        axes.text(0.5, 0.5, "no held-out evaluation\n(train.py --valid_data_file)", ha="center", va="center",
                  transform=axes.transAxes)
        return
    shown = [(rows[0], "grey", "first"), (rows[-1], "tab:red", "last")] if len(rows) > 1 else [(rows[0], "tab:red", "")]
    for row, color, which in shown:
        points = [(end, _drawable(loss)) for _, end, loss in row["loss_by_position"] if loss is not None]
        axes.plot([end for end, _ in points], [loss for _, loss in points], "o-", color=color,
                  label=f"{which} evaluation, after mini-epoch {row['epoch']}".lstrip())
    axes.set_xscale("log", base=2)
    axes.legend()
