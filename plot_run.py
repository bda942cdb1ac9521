"""Draw a training run as one PNG: loss (training and held-out) and learning rate by step, and the held-out loss
by position in the window.

    python plot_run.py out/                  # -> out/run.png
    python plot_run.py out/ --out run.png

Reads train_steps.tsv and valid.tsv (train.py --valid_data_file) in the folder. Exit code 0 when the picture is
written, 2 for bad input (one line on stderr).
"""
import argparse
import sys
from pathlib import Path

from src import cli
from src.io.atomic import check_output_file
from src.errors import UserInputError

PROG = "plot_run.py"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=cli.FlagHelpFormatter)
    parser.add_argument("proj_dir", help="The --proj_dir of a train.py run.")
    parser.add_argument("--out", default="", help="The PNG to write (default: run.png in the run's folder; "
                                                  "an existing picture is replaced).")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run_main(PROG, lambda: plot(args))


def plot(args: argparse.Namespace) -> int:
    """Draws the picture of the parsed command line `args`; returns 0 once it is written."""
    from src.train.plot import PLOT_NAME, plot_run

    if not Path(args.proj_dir).is_dir():
        raise UserInputError(f"{args.proj_dir} is not a folder; give the --proj_dir of a train.py run")
    out = Path(args.out) if args.out else Path(args.proj_dir) / PLOT_NAME
    check_output_file(out, replace=True, what="--out")
    steps, evaluations = plot_run(args.proj_dir, out)
    print(f"{PROG}: wrote {out} ({steps:,} optimizer steps, {evaluations:,} held-out evaluations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
