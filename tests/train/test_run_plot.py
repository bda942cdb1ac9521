"""plot_run.py: a run's folder as a PNG that opens, with and without held-out evaluations; runs appended to one
folder placed one after the other; bad input in one line."""
import pytest
from PIL import Image

import plot_run
from src.train.plot import evaluation_steps, moving_average, read_steps


def drawn(capsys, argv, out) -> Image.Image:
    capsys.readouterr()
    assert plot_run.main(argv) == 0
    assert capsys.readouterr().out.startswith(f"plot_run.py: wrote {out} (")
    assert out.stat().st_size > 20_000  # three panels of curves, axes and text, not an empty canvas
    with Image.open(out) as image:
        image.load()  # decodes every pixel: a whole, valid PNG
        return image


def test_a_run_with_held_out_evaluations(validated_run, tmp_path, capsys):
    proj_dir, _, _ = validated_run
    image = drawn(capsys, [str(proj_dir), "--out", str(tmp_path / "run.png")], tmp_path / "run.png")
    assert image.format == "PNG" and image.size == (1600, 480)
    # the picture has colour (the curves), not only the grey of axes and text
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100


def test_a_run_without_them_goes_into_its_folder(finished_copy, capsys):
    image = drawn(capsys, [str(finished_copy)], finished_copy / "run.png")
    assert image.size == (1600, 480)


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "nothing", ["is not a folder"]),
    (lambda tmp: tmp, ["has no train_steps.tsv"]),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, words):
    capsys.readouterr()
    assert plot_run.main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot_run.py: error: ") and err.count("\n") == 1 and all(w in err for w in words), err


def test_runs_appended_to_one_folder_follow_each_other(tmp_path):
    """A run continued by hand counts its steps from 1 again; its rows are placed after the first run's, and an
    evaluation at the last step of its mini-epoch."""
    rows = [(1, 0), (2, 0), (3, 1), (4, 1), (1, 2), (2, 2), (3, 3)]
    (tmp_path / "train_steps.tsv").write_text(
        "step\tepoch\tloss\tlr\tctx_len\tGtokens\tkt/s\n"
        + "".join(f"{step}\t{epoch}\t2.5\t1e-4\t16\t0.0\t1.0\n" for step, epoch in rows))
    steps = read_steps(tmp_path)
    assert steps["x"] == [1, 2, 3, 4, 5, 6, 7]
    assert evaluation_steps(steps, [{"epoch": 1, "step": 4}, {"epoch": 2, "step": 2}, {"epoch": 9, "step": 8}]) \
        == [4, 6, 8]


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
