"""Aliases of parameters: the module computes with them, gradients land on them, the originals come back."""
import pytest
import torch
import torch.nn as nn

from src.train.state_cp.aliases import aliases_of, parameters_replaced


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def test_the_module_runs_on_the_aliases_and_their_gradients_stay_there():
    model = two_layers()
    names = ["0.weight", "2.bias"]
    originals = [model.get_parameter(name) for name in names]
    hooked = []
    for p in originals:
        p.register_hook(lambda grad: hooked.append(grad))
    aliases = aliases_of(originals)
    assert all(a.data_ptr() == p.data_ptr() and a is not p for a, p in zip(aliases, originals))
    x = torch.randn(5, 4)
    expected = model(x)
    with parameters_replaced(model, dict(zip(names, aliases))):
        assert model.get_parameter("0.weight") is aliases[0]
        out = model(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same storage, the same values
    assert all(a.grad is not None for a in aliases)
    assert all(p.grad is None for p in originals) and not hooked  # nothing reached the originals
    assert [model.get_parameter(name) for name in names] == originals
    assert model[2].weight.grad is not None  # parameters that were not replaced train as usual


def test_the_originals_come_back_when_the_block_raises():
    model = two_layers()
    original = model[0].weight
    with pytest.raises(RuntimeError, match="inside"):
        with parameters_replaced(model, {"0.weight": aliases_of([original])[0]}):
            raise RuntimeError("inside")
    assert model[0].weight is original
