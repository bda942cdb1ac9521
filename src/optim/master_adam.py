"""One Adam step of 16-bit weights through their fp32 masters, for many tensors at once.

Three twins with one signature, updating their arguments in place:

    master_adam_torch(weights, grads, masters, exp_avgs, exp_avg_sqs, *, lr, betas, eps, weight_decay, adamw,
                      step, clip)    # the reference: PyTorch operations, any device
    master_adam_cuda(...)            # one kernel launch for all the tensors (src/optim/cuda/master_adam.cu)
    master_adam_host(...)            # torch's fused one-pass CPU Adam, for host tensors (--strategy offload)

`weights` and `grads` are 16-bit (or fp32) tensors of one dtype; `masters`, `exp_avgs` and `exp_avg_sqs` are their
fp32 master copy and Adam's moments; `step` is this step's number (1 for the first) for every tensor of the call;
`clip` is the gradient clipping coefficient as a 0-d fp32 tensor on the device (None: 1). Per element, in fp32,
as torch's Adam and AdamW compute it:

    g = grad * clip;   Adam: g += weight_decay * master;   AdamW: master -= lr * weight_decay * master
    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    master -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps);   weight = round(master)

The kernel moves 28 bytes per element (reads the 16-bit gradient, master and moments; writes them and the weight)
and allocates nothing but a table of the tensors' addresses; the reference makes fp32 temporaries of one tensor
at a time (8 bytes per element of the largest). The host twin converts a 16-bit gradient to fp32 first (a fp32
gradient with clip None is read as it is). tests/optim/test_master_adam.py compares the twins.
"""
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch.optim.adam import adam

from src.cuda_extension import CudaExtension

EXTENSION = CudaExtension("master_adam", "the master-weight Adam CUDA kernel",
                          Path(__file__).resolve().parent / "cuda", sources=("master_adam.cu",))

Tensors = List[torch.Tensor]


def master_adam_torch(weights: Tensors, grads: Tensors, masters: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                      *, lr: float, betas: tuple, eps: float, weight_decay: float, adamw: bool, step: int,
                      clip: Optional[torch.Tensor]) -> None:
    """The reference step: per tensor, the operations of torch's single-tensor Adam/AdamW on an fp32 gradient."""
    beta1, beta2 = betas
    step_size = lr / (1 - beta1 ** step)
    bias2_sqrt = (1 - beta2 ** step) ** 0.5  # as torch's Adam computes it
    for weight, grad, master, exp_avg, exp_avg_sq in zip(weights, grads, masters, exp_avgs, exp_avg_sqs):
        g = grad.to(torch.float32, copy=True)  # a copy for an fp32 gradient too: the gradient stays as it was
        if clip is not None:
            g.mul_(clip)
        if weight_decay and adamw:
            master.mul_(1 - lr * weight_decay)
        elif weight_decay:
            g.add_(master, alpha=weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-step_size)
        weight.copy_(master)


def master_adam_host(weights: Tensors, grads: Tensors, masters: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                     *, lr: float, betas: tuple, eps: float, weight_decay: float, adamw: bool, step: int,
                     clip: Optional[torch.Tensor]) -> None:
    """The same step with torch's fused CPU Adam (one vectorised pass over master and moments per tensor), which
    bench/host_adam.py measured at several times the reference's speed on the host."""
    beta1, beta2 = betas
    for weight, grad, master, exp_avg, exp_avg_sq in zip(weights, grads, masters, exp_avgs, exp_avg_sqs):
        g = grad
        if grad.dtype != torch.float32 or clip is not None:
            g = grad.to(torch.float32, copy=True)
            if clip is not None:
                g.mul_(clip)
        # the fused kernel counts the step itself: it is given the count of steps before this one
        adam([master], [g], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step - 1))], fused=True,
             decoupled_weight_decay=adamw, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
             weight_decay=weight_decay, eps=eps, maximize=False)
        weight.copy_(master)


def master_adam_cuda(weights: Tensors, grads: Tensors, masters: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                     *, lr: float, betas: tuple, eps: float, weight_decay: float, adamw: bool, step: int,
                     clip: Optional[torch.Tensor]) -> None:
    """The same step in one launch of the CUDA kernel (built on first use). The host only writes the address table;
    nothing waits for the GPU."""
    if not weights:
        return
    device, dtype = weights[0].device, weights[0].dtype
    if device.type != "cuda":
        raise ValueError(f"master_adam_cuda: the tensors must be on a CUDA device, got {device}")
    module = EXTENSION.module()
    chunk = module.chunk_elements()
    rows, chunks = [], 0
    for index, tensors in enumerate(zip(weights, grads, masters, exp_avgs, exp_avg_sqs)):
        _check_row(index, tensors, device, dtype)
        weight, grad, master, exp_avg, exp_avg_sq = tensors
        numel = weight.numel()
        rows.append([grad.data_ptr(), weight.data_ptr(), master.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                     numel, chunks])  # the kernel's column order
        chunks += -(-numel // chunk)
    # pinned, so the copy does not wait; torch keeps the pinned block until the copy has run
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    if clip is None:
        clip = torch.ones((), dtype=torch.float32, device=device)
    beta1, beta2 = betas
    module.step(table, weights[0], chunks, clip.float().reshape(()), lr, beta1, beta2, eps, weight_decay, adamw,
                lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5)


def _check_row(index: int, tensors: tuple, device: torch.device, dtype: torch.dtype) -> None:
    """What the kernel assumes of one tensor's five parts: one device, contiguous, equal sizes, known dtypes."""
    weight = tensors[0]
    names = ("weight", "gradient", "master", "first moment", "second moment")
    for name, tensor, expected in zip(names, tensors, (dtype, dtype) + (torch.float32,) * 3):
        if tensor.device != device or tensor.dtype != expected or not tensor.is_contiguous():
            raise ValueError(f"master_adam_cuda: tensor {index}'s {name} must be a contiguous {expected} tensor on "
                             f"{device}, got a {'contiguous' if tensor.is_contiguous() else 'strided'} "
                             f"{tensor.dtype} tensor on {tensor.device}")
        if tensor.shape != weight.shape:
            raise ValueError(f"master_adam_cuda: tensor {index}'s {name} has shape {tuple(tensor.shape)}, its weight "
                             f"{tuple(weight.shape)}")


def choose(on_cuda: bool) -> Callable:
    """The step for tensors on CUDA (the kernel; the reference after one warning if it cannot be built) or
    elsewhere (the reference)."""
    if not on_cuda:
        return master_adam_torch
    return EXTENSION.choose(master_adam_cuda, master_adam_torch, "the PyTorch reference step")
