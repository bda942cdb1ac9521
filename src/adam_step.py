"""One Adam step of one 16-bit parameter through its fp32 master weight, and its fused twin.

The master-weight optimizer (src/master_weights.py) steps every trained parameter of a bf16 model this way:

    g = fp32(grad) * clip                             clip: the global-norm clipping coefficient (1: none)
    AdamW: master *= 1 - lr * wd                      Adam: g += wd * master
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    master -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
    param = 16-bit(master)

This is torch's Adam/AdamW on the master (its CUDA kernel's order of operations, the bias corrections in fp64),
with the gradient read in 16 bits. `adam_step_` is the reference, plain PyTorch, one kernel per operation: about
130 bytes of memory traffic per parameter. torch's own fused Adam on the masters would need the gradients
converted to fp32 and clipped first: about 50 bytes. A step needs 28: read the 16-bit
gradient, the master and both moments; write those three and the 16-bit weight. The fused twin is adam_step_
compiled by torch.compile, whose Inductor backend makes it one kernel that moves those 28. It runs on CUDA tensors
only; tests/test_adam_step.py holds the two together, and the reference against torch's Adam.
"""
import functools

import torch


def adam_step_(param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, step: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor,
               clip: torch.Tensor, *, beta1: float, beta2: float, eps: float, decoupled: bool) -> None:
    """One step, in place: param (16-bit) and grad of one shape; master, exp_avg, exp_avg_sq fp32 of that shape.
    step is the step count after this step, lr, weight_decay and clip are fp32 scalars: 0-d tensors on the
    parameter's device, so that a new learning rate or coefficient never makes the host wait for the GPU.
    decoupled: AdamW's weight decay (else Adam's L2 term in the gradient)."""
    g = grad.float() * clip
    if decoupled:
        master.mul_(1 - lr * weight_decay)
    else:
        g = g + weight_decay * master
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step = step.double()  # as torch's kernels: fp32 would lose 1 - 0.999^1 to rounding
    step_size = (lr / (1 - beta1 ** step)).float()
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt().float()
    master.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps))
    param.copy_(master)


@functools.cache
def _fused():
    """adam_step_ compiled, once per process. dynamic=True: the optimizer passes every tensor flattened, so one
    kernel serves every parameter (the constants beta1, beta2, eps and decoupled are fixed for a run)."""
    return torch.compile(adam_step_, dynamic=True)


def step_function(fused: bool):
    """The per-parameter step to run: the fused one (CUDA tensors only) or the reference. Pass it 1-D views
    (`tensor.view(-1)`): the fused one is compiled for one rank."""
    return _fused() if fused else adam_step_
