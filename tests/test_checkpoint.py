"""Weight files: atomic writes, plain tensor dicts, clear load errors."""
import pytest
import torch

from src.checkpoint import atomic_save, load_weights, save_weights
from src.config import UserInputError


def test_save_casts_and_writes_plain_cpu_tensors(tmp_path):
    save_weights({"a": torch.ones(2, requires_grad=True), "n": torch.arange(3)}, tmp_path / "w.pth", torch.bfloat16)
    loaded = torch.load(tmp_path / "w.pth", weights_only=True)
    assert loaded["a"].dtype == torch.bfloat16 and loaded["n"].dtype == torch.int64
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "w.pth"
    save_weights({"a": torch.zeros(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise KeyboardInterrupt  # as if Ctrl+C arrived in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.ones(1), "b": Unpicklable()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]
    assert load_weights(path)["a"].item() == 0


def test_wrapper_prefixes_are_stripped(tmp_path):
    save_weights({"_forward_module.model.emb.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    assert list(load_weights(tmp_path / "w.pth")) == ["emb.weight"]
    save_weights({"model.emb.weight": torch.zeros(2, 2)}, tmp_path / "v.pth")
    assert list(load_weights(tmp_path / "v.pth")) == ["emb.weight"]


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserInputError, match="is not a PyTorch file"):
        load_weights(tmp_path / "text.pth")
    torch.save({"step": 3}, tmp_path / "dict.pth")
    with pytest.raises(UserInputError, match="plain state dict of tensors"):
        load_weights(tmp_path / "dict.pth")
