"""Draw a training run as one PNG: loss (training and held-out) and learning rate by step, and the held-out loss
by position in the window.

    python plot_run.py out/                  # -> out/run.png
    python plot_run.py out/ --out run.png

Reads train_steps.tsv and valid.tsv (train.py --valid_data_file) in the folder. The picture replaces only a picture
this tool drew (its PNG says so); any other existing file is refused. Exit code 0 when the picture is written, 2 for
bad input (one line on stderr, nothing written), 130 / 143 after Ctrl+C / SIGTERM (nothing written).
"""
import argparse
import sys
from pathlib import Path

from src import cli
from src.errors import UserInputError

PROG = "plot_run.py"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=cli.FlagHelpFormatter)
    parser.add_argument("proj_dir", help="The --proj_dir of a train.py run.")
    parser.add_argument("--out", default="", help="The PNG to write (default: run.png in the run's folder). An "
                                                  "existing picture that plot_run.py drew is replaced; any other "
                                                  "existing file is refused.")
    return parser


def main(argv=None) -> int:
    def body():
        with cli.signals_interrupt():  # SIGTERM too deletes the picture being written
            return plot(build_parser().parse_args(argv))

    return cli.run_main(PROG, body, interrupted="{prog}: {signal}: stopped; nothing was written")


def plot(args: argparse.Namespace) -> int:
    """Draws the picture of the parsed command line `args`; returns 0 once it is written."""
    from src.io.atomic import check_output_file
    from src.io.outputs import STEP_LOG_NAME
    from src.eval.valid_tsv import VALID_LOG_NAME
    from src.train.plot import PLOT_NAME, drawn_by_plot_run, plot_run

    proj_dir = Path(args.proj_dir)
    if not proj_dir.is_dir():
        raise UserInputError(f"{proj_dir} is not a folder; give the --proj_dir of a train.py run")
    out = Path(args.out) if args.out else proj_dir / PLOT_NAME
    if out.suffix.lower() != ".png":
        raise UserInputError(f"--out {out}: the picture is a PNG; give a name that ends in .png")
    inputs = [(name, proj_dir / name) for name in (STEP_LOG_NAME, VALID_LOG_NAME)]
    found = check_output_file(out, replace=True, what="--out", inputs=inputs)
    if found.exists and not drawn_by_plot_run(out):
        raise UserInputError(f"--out {out} exists and is not a picture that plot_run.py drew; choose another name "
                             f"(or delete it)")
    steps, evaluations = plot_run(proj_dir, out, replace=found)
    print(f"{PROG}: wrote {out} ({steps:,} optimizer steps, {evaluations:,} held-out evaluations)")
    return 0


if __name__ == "__main__":
    cli.exit_process(main())
