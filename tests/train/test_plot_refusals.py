"""plot_run.py never destroys work: hostile --out paths and damaged logs through its real command line, each refused
with exit 2 and one line, every file of the folder byte-identical; only a picture it drew is replaced; a full disk
is one line; a real SIGINT / SIGTERM while the picture is written stops it with one line and nothing left."""
import os
import shutil
import signal

import pytest
from matplotlib.figure import Figure

import plot_run
from helpers import WRITING, folder_snapshot, full_disk_after, refused_in_one_line, signalled_both
from src.io import atomic
from src.train.plot import drawn_by_plot_run

STEPS_HEADER = "step\tepoch\tloss\tlr\tctx_len\tGtokens\tkt/s\n"
VALID_HEADER = "epoch\tstep\tloss\tperplexity\ttokens\tseconds\tloss_by_position\n"


def refused(argv, capsys, *expected):
    return refused_in_one_line([str(a) for a in argv], capsys, *expected, main=plot_run.main, prog="plot_run.py")


def foreign_png(path):
    """A PNG that plot_run.py did not draw (matplotlib's own metadata)."""
    Figure(figsize=(1, 1)).savefig(path, format="png")


def replace_line(path, index, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[index] = text
    path.write_text("".join(lines))


# (what to do to a copy of the validated run, the --out to ask for (None: the default), words of the refusal)
CASES = {
    "checkpoint": (None, "rwkv-final.pth", ["ends in .png"]),
    "own input": (None, "train_steps.tsv", ["ends in .png"]),
    "train log": (None, "train_log.txt", ["ends in .png"]),
    "valid.tsv": (None, "valid.tsv", ["ends in .png"]),
    "someone's picture": (lambda run: foreign_png(run / "mine.png"), "mine.png", ["not a picture that plot_run.py"]),
    "someone's run.png": (lambda run: foreign_png(run / "run.png"), None, ["not a picture that plot_run.py drew"]),
    "a folder": (lambda run: (run / "pictures.png").mkdir(), "pictures.png", ["is a folder"]),
    "under a file": (None, "train_steps.tsv/x.png", ["train_steps.tsv"]),
    "a named pipe": (lambda run: os.mkfifo(run / "pipe.png"), "pipe.png", ["is not a regular file"]),
    "hard link to the log": (lambda run: os.link(run / "train_steps.tsv", run / "steps.png"), "steps.png",
                             ["is train_steps.tsv"]),
    "link to a checkpoint": (lambda run: os.symlink(run / "rwkv-final.pth", run / "final.png"), "final.png",
                             ["not a picture that plot_run.py drew"]),
    "steps: binary": (lambda run: (run / "train_steps.tsv").write_bytes(STEPS_HEADER.encode() + b"1\t0\t\xff\xfe\n"),
                      None, ["train_steps.tsv:2: not UTF-8"]),
    "steps: no header": (lambda run: (run / "train_steps.tsv").write_text("1\t0\t2.5\t1e-4\t16\t0.0\t1.0\n"), None,
                         ["is not a header with the columns step, epoch, loss, lr"]),
    "steps: a column short": (lambda run: (run / "train_steps.tsv").write_text("step\tepoch\tloss\n1\t0\t2.5\n"),
                              None, ["the column lr"]),
    "steps: fields missing": (lambda run: replace_line(run / "train_steps.tsv", 2, "2\t0\t2.5\n"), None,
                              ["train_steps.tsv:3: 3 fields where the header names 7"]),
    "steps: text loss": (lambda run: replace_line(run / "train_steps.tsv", 1, "1\t0\tabc\t1e-4\t16\t0\t1\n"), None,
                         ["train_steps.tsv:2: loss is 'abc', not a number"]),
    "steps: fractional step": (lambda run: replace_line(run / "train_steps.tsv", 1, "1.5\t0\t2\t1e-4\t16\t0\t1\n"),
                               None, ["step is '1.5', not a whole number"]),
    "steps: huge step": (lambda run: replace_line(run / "train_steps.tsv", 1, f"{10**30}\t0\t2\t1e-4\t16\t0\t1\n"),
                         None, ["outside 0..2**62"]),
    "steps: negative epoch": (lambda run: replace_line(run / "train_steps.tsv", 1, "1\t-1\t2\t1e-4\t16\t0\t1\n"),
                              None, ["epoch is '-1'"]),
    "steps: infinite lr": (lambda run: replace_line(run / "train_steps.tsv", 1, "1\t0\t2\tinf\t16\t0\t1\n"), None,
                           ["lr is 'inf', not a learning rate"]),
    "steps: a named pipe": (lambda run: ((run / "train_steps.tsv").unlink(), os.mkfifo(run / "train_steps.tsv")),
                            None, ["train_steps.tsv is not a file"]),
    "steps: a folder": (lambda run: ((run / "train_steps.tsv").unlink(), (run / "train_steps.tsv").mkdir()), None,
                        ["train_steps.tsv is not a file"]),
    "valid: binary": (lambda run: (run / "valid.tsv").write_bytes(b"\x00\x9f\x92\x96 binary"), None,
                      ["valid.tsv:1: not UTF-8"]),
    "valid: no header": (lambda run: (run / "valid.tsv").write_text("0\t2\t2.6\t13.8\t100\t0.7\t[[0,16,2.6]]\n"),
                         None, ["valid.tsv: its first line"]),
    "valid: cut JSON": (lambda run: replace_line(run / "valid.tsv", 1, "0\t2\t2.6\t13.8\t100\t0.7\t[[0,16,2.6\n"),
                        None, ["valid.tsv:2: loss_by_position '[[0,16,2.6' is not JSON"]),
    "valid: JSON object": (lambda run: replace_line(run / "valid.tsv", 1, "0\t2\t2.6\t13.8\t100\t0.7\t{}\n"), None,
                           ["is not a list of [start, end, loss]"]),
    "valid: empty bucket": (lambda run: replace_line(run / "valid.tsv", 1, "0\t2\t2.6\t13.8\t100\t0.7\t[[16,16,1]]\n"),
                            None, ["whose positions are not 0 <= start < end"]),
    "valid: huge position": (lambda run: replace_line(run / "valid.tsv", 1,
                                                      f"0\t2\t2.6\t13.8\t100\t0.7\t[[0,{10**400},1]]\n"),
                             None, ["whose positions are not"]),
    "valid: text loss": (lambda run: replace_line(run / "valid.tsv", 1, "0\t2\tx\t13.8\t100\t0.7\t[[0,16,2.6]]\n"),
                         None, ["valid.tsv:2: loss is 'x'"]),
    "valid: text bucket loss": (lambda run: replace_line(run / "valid.tsv", 1,
                                                         '0\t2\t2.6\t13.8\t100\t0.7\t[[0,16,"a"]]\n'),
                                None, ["whose loss is not a number"]),
}


@pytest.mark.parametrize("damage, out, words", CASES.values(), ids=CASES.keys())
def test_hostile_outputs_and_damaged_logs_are_refused_and_nothing_changes(validated_run, tmp_path, capsys, damage,
                                                                           out, words):
    run = shutil.copytree(validated_run[0], tmp_path / "run", symlinks=True)
    if damage:
        damage(run)
    before = folder_snapshot(run)
    refused([run] + (["--out", run / out] if out else []), capsys, *words)
    assert folder_snapshot(run) == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_a_run_folder_that_is_not_one(tmp_path, capsys):
    refused([tmp_path / "nothing"], capsys, "is not a folder")
    refused([tmp_path], capsys, "has no train_steps.tsv")
    assert list(tmp_path.iterdir()) == []


def test_only_a_picture_it_drew_is_replaced(finished_copy, tmp_path, capsys):
    assert plot_run.main([str(finished_copy)]) == 0
    assert drawn_by_plot_run(finished_copy / "run.png")
    first = (finished_copy / "run.png").stat().st_ino
    assert plot_run.main([str(finished_copy)]) == 0  # its own picture: replaced
    assert (finished_copy / "run.png").stat().st_ino != first and drawn_by_plot_run(finished_copy / "run.png")
    foreign_png(tmp_path / "other.png")
    assert not drawn_by_plot_run(tmp_path / "other.png") and not drawn_by_plot_run(finished_copy / "rwkv-final.pth")


def test_empty_logs_are_new_logs(finished_copy, capsys):
    """train.py takes an empty log as a new one: no rows, drawn as such."""
    (finished_copy / "train_steps.tsv").write_bytes(b"")
    (finished_copy / "valid.tsv").write_bytes(b"")
    capsys.readouterr()
    assert plot_run.main([str(finished_copy)]) == 0
    assert "(0 optimizer steps, 0 held-out evaluations)" in capsys.readouterr().out


def test_a_diverged_run_and_a_row_being_appended_still_draw(finished_copy, capsys):
    """NaN and infinite losses are gaps; a last line without its newline is a row being written, left out."""
    steps = finished_copy / "train_steps.tsv"
    steps.write_text(STEPS_HEADER + "1\t0\t2.5\t1e-4\t16\t0\t1\n2\t0\tnan\t1e-4\t16\t0\t1\n3\t1\tinf\t1e-4\t16\t0\t1\n"
                     "4\t1\t2.")
    capsys.readouterr()
    assert plot_run.main([str(finished_copy)]) == 0
    assert "(3 optimizer steps," in capsys.readouterr().out


def test_a_picture_that_appeared_meanwhile_is_kept(finished_copy, capsys, monkeypatch):
    """Another command wrote --out while this one drew: refused at the end, that file left as it is."""
    real_figure = Figure

    def figure_and_a_newcomer(*args, **kwargs):
        (finished_copy / "run.png").write_bytes(b"another command's")
        return real_figure(*args, **kwargs)

    monkeypatch.setattr("matplotlib.figure.Figure", figure_and_a_newcomer)
    refused([finished_copy], capsys, "was written by another command while this one ran")
    assert (finished_copy / "run.png").read_bytes() == b"another command's"


def test_a_full_disk_is_one_line_naming_the_size(finished_copy, capsys, monkeypatch):
    before = folder_snapshot(finished_copy)
    monkeypatch.setattr(atomic, "_write", full_disk_after(1000))
    err = refused([finished_copy], capsys, "no space left on the device of", "for run.png (about ", "kB needed")
    assert "0 bytes needed" not in err
    assert folder_snapshot(finished_copy) == before


def test_sigint_and_sigterm_while_the_picture_is_written_leave_nothing(finished_run, tmp_path):
    """A real SIGINT and a real SIGTERM, each to its own process, inside the write of the picture (slowed down):
    one line each, exit 130 / 143, no temporary file left, every earlier file as it was."""
    copies = {signum: shutil.copytree(finished_run, tmp_path / signum.name) for signum in (signal.SIGINT,
                                                                                           signal.SIGTERM)}
    before = {signum: folder_snapshot(copy) for signum, copy in copies.items()}
    results = signalled_both("plot_run.py", {signum: ([copy], lambda printed: WRITING in printed)
                                             for signum, copy in copies.items()}, slow_writes=30)
    for signum, (returncode, printed, err) in results.items():
        assert returncode == 128 + signum, (printed, err)
        assert err == f"plot_run.py: {signum.name}: stopped; nothing was written\n", err
        assert folder_snapshot(copies[signum]) == before[signum] and not list(copies[signum].glob(".*"))
