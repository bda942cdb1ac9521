import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A tiny run of two mini-epochs on the built-in data (each saved), for tests of what a later run does in its folder.
TINY_RUN = ["--data_type", "dummy", "--n_layer", "1", "--n_embd", "16", "--ctx_len", "16", "--micro_bsz", "2",
            "--epoch_steps", "2", "--epoch_count", "2", "--epoch_save", "1", "--wkv_backend", "torch",
            "--enable_progress_bar", "0", "--random_seed", "1"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The --proj_dir of a finished TINY_RUN (trained once per test session; copy it before changing it)."""
    import train

    proj_dir = tmp_path_factory.mktemp("finished") / "out"
    assert train.main([*TINY_RUN, "--proj_dir", str(proj_dir)]) == 0
    return proj_dir


@pytest.fixture
def finished_copy(finished_run, tmp_path):
    """A copy of the finished run for one test to change or try to damage."""
    return shutil.copytree(finished_run, tmp_path / "out")


@pytest.fixture(scope="session")
def validated_run(tmp_path_factory):
    """TINY_RUN with held-out data (the last 2000 characters of the built-in text, as a utf-8 file) and offline W&B:
    (its --proj_dir, the held-out file, what it printed on stdout)."""
    import train
    from src.data.dataset import dummy_text

    folder = tmp_path_factory.mktemp("validated")
    held_out = folder / "held_out.txt"
    held_out.write_text(dummy_text()[-2000:], encoding="utf-8")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(printed):
        env.setenv("WANDB_MODE", "offline")
        assert train.main([*TINY_RUN, "--proj_dir", str(folder / "out"), "--valid_data_file", str(held_out),
                           "--valid_data_type", "utf-8", "--wandb", "rwkv-test"]) == 0
    return folder / "out", held_out, printed.getvalue()
