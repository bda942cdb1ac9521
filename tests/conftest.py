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
