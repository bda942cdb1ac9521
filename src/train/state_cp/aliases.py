"""Running a module on stand-ins for some of its parameters, through nn.Module's public API.

An alias is a new nn.Parameter over the same storage as the parameter it stands in for: the forward sees the
same values, but autograd accumulates the gradient into the alias, and nothing registered on the original
parameter (DDP's or DeepSpeed's gradient hooks, its .grad) sees it. src/train/state_cp/engine.py runs its segment passes
on aliases so that each parameter receives its gradient once per micro-batch.
"""
import contextlib
from typing import Dict, List, Sequence

import torch
import torch.nn as nn


def aliases_of(parameters: Sequence[torch.Tensor]) -> List[nn.Parameter]:
    """A trainable alias of each parameter: the same storage, its own autograd identity."""
    return [nn.Parameter(p.detach(), requires_grad=True) for p in parameters]


@contextlib.contextmanager
def parameters_replaced(model: nn.Module, replacements: Dict[str, nn.Parameter]):
    """Within the block, model's parameter `name` is `replacements[name]` (nn.Parameters, e.g. from aliases_of);
    the originals are back afterwards, also when the block raises."""
    slots = []
    for name in replacements:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        slots.append((owner, leaf, getattr(owner, leaf)))
    try:
        for (owner, leaf, _), replacement in zip(slots, replacements.values()):
            setattr(owner, leaf, replacement)  # nn.Module registers an nn.Parameter under that name
        yield
    finally:
        for owner, leaf, original in slots:
            setattr(owner, leaf, original)
