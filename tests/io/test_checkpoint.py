"""Weight files: atomic writes, plain tensor dicts, clear load errors."""
import argparse
import os

import pytest
import torch

from src.io.checkpoint import atomic_save, compare_weights, load_weights, save_weights
from src.errors import UserInputError


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


def test_unreadable_files_say_what_they_are_not_without_torchs_unsafe_advice(tmp_path):
    save_weights({"a": torch.zeros(100)}, tmp_path / "w.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:300])
    (tmp_path / "random.pth").write_bytes(os.urandom(2000))
    torch.save({"a": torch.zeros(1), "args": argparse.Namespace(lr=1)}, tmp_path / "objects.pth")
    for name, what in [("cut.pth", "is a damaged PyTorch file"), ("random.pth", "is not a PyTorch file"),
                       ("objects.pth", "holds Python objects besides tensors")]:
        with pytest.raises(UserInputError) as error:
            load_weights(tmp_path / name)
        message = str(error.value)
        assert f"--load_model: {tmp_path / name} {what}" in message and "; expected a .pth of {name: tensor}" in message
        assert "weights_only" not in message and "\n" not in message


def test_compare_weights_lists_missing_unexpected_and_other_shapes():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    differences = compare_weights(expected, {"z": torch.zeros(1), "b": (5,), "a": torch.zeros(2, 3)})
    assert (differences.missing, differences.unexpected, differences.mismatched) == (["c"], ["z"], ["b"])
    assert differences and not compare_weights(expected, {"c": (1,), "b": torch.zeros(4), "a": (2, 3)})
