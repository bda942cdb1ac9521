"""The training loss: mean next-token cross-entropy over the unmasked targets, plus BlinkDL's L2Wrap.

Targets equal to IGNORE_INDEX (-100) are masked: they add nothing to the loss or its gradient.
`language_model_loss` takes the normaliser explicitly so that a sample trained in segments
(src/infctx.py) gets exactly the loss of the whole sample: each segment divides its summed
cross-entropy by the unmasked targets of the whole sample, and L2Wrap by all of its positions.
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target id that cross_entropy skips

L2WRAP_COEF = 1e-4


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, adds the gradient of 1e-4 * mean(max_logit^2) / 2 to the logits.

    This keeps logits from drifting upward (BlinkDL's L2Wrap). Unlike the original, the extra gradient is
    multiplied by the incoming gradient, so it scales with gradient accumulation and fp16 loss scaling.
    `positions` is the number of (batch, time) positions the mean runs over.
    """

    @staticmethod
    def forward(ctx, loss, logits, positions: int):
        ctx.save_for_backward(logits)
        ctx.positions = positions
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        top, ids = torch.max(logits, dim=-1, keepdim=True)  # (B, T, 1)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, top * (L2WRAP_COEF / ctx.positions))
        return grad_output, glogits * grad_output.to(glogits.dtype), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets != IGNORE_INDEX. logits (B, T, V), targets (B, T).

    Computed in fp32 at least (fp64 logits stay fp64, for gradient checks).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """Number of unmasked targets, at least 1 (a batch whose targets are all masked gives loss 0, not 0/0)."""
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor, targets_in_sample: Optional[torch.Tensor] = None,
                        positions_in_sample: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy with L2Wrap. logits (B, T, V), targets (B, T).

    The mean runs over `targets_in_sample` unmasked targets and L2Wrap over `positions_in_sample`
    positions: by default those of `targets`; a segment of a longer sample passes the whole sample's.
    """
    count: Union[torch.Tensor, int] = target_count(targets) if targets_in_sample is None else targets_in_sample
    positions = targets.numel() if positions_in_sample is None else positions_in_sample
    loss = cross_entropy_sum(logits, targets) / count
    return L2Wrap.apply(loss, logits, positions)
