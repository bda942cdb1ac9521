"""Adam with its state in host memory for bf16 parameters on one GPU (--strategy offload): the GPU holds the bf16
weights and the activations; the host holds, per trained parameter, the fp32 master, Adam's two fp32 moments and
one 16-bit staging buffer for the gradient, 14 bytes, and nothing else of that size.

Numerics are those of MasterWeightAdam (src/optim/master_weights.py), which --strategy auto runs for bf16:

    gradient   the bf16 gradients of a step's micro-batches, summed in bf16 as autograd sums them in .grad
    clip       min(1, max_norm / (||grad|| + 1e-6)), one fp32 norm over every parameter's bf16 gradient
    step       master = Adam(master, fp32(grad) * clip) in fp32 with torch's fused CPU Adam
               (src/optim/master_adam.py master_adam_host; bench/host_adam.py measured the CPU Adams);
               weight = bf16(master)

Where the work happens, so that the GPU waits as little as possible:
- each parameter's gradient leaves the GPU as soon as the backward has accumulated it (a post-accumulate hook):
  a copy on a side stream into its pinned staging buffer, then the GPU gradient is freed, so the GPU never holds
  the gradients of the whole model; with gradient accumulation later micro-batches' gradients are added to the
  staging buffer on the host (in bf16, as autograd adds them on the device);
- the optimizer step waits for the last copies, computes the norm, then updates the parameters one at a time
  on the CPU (torch's threads; the gradient in fp32 in one scratch buffer the size of the largest parameter) while
  the updated bf16 weights of the parameters before go back to the GPU on the side stream.
On a machine without CUDA the same code runs with the host as the device (the tests use it that way).
"""
from typing import Callable, List

import torch

from src.optim.master_adam import master_adam_host
from src.optim.master_weights import MasterWeightAdam


class HostOffloadAdam(torch.optim.Optimizer):
    """Adam (or AdamW with weight_decay groups) over host fp32 masters of the 16-bit parameters in `param_groups`.

    The groups keep the model's parameters, so the LR schedule steers the step through group["lr"]; each group may
    carry "lr_scale" and "weight_decay" like the groups of src/train/trainer.py build_param_groups. Each parameter
    counts its own steps, as torch's Adam does.
    """

    def __init__(self, param_groups: List[dict], lr: float, betas: tuple, eps: float, adamw: bool,
                 max_grad_norm: float, host_step: Callable = master_adam_host):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.max_grad_norm, self.adamw = max_grad_norm, adamw
        params = [p for group in self.param_groups for p in group["params"]]
        self.device = params[0].device if params else torch.device("cpu")
        pinned = self.device.type == "cuda"
        self.masters = [[p.detach().to("cpu", torch.float32, copy=True) for p in group["params"]]
                        for group in self.param_groups]
        self.exp_avgs = [[torch.zeros_like(m) for m in masters] for masters in self.masters]
        self.exp_avg_sqs = [[torch.zeros_like(m) for m in masters] for masters in self.masters]
        self.steps = [[0] * len(masters) for masters in self.masters]
        # the gradient on its way in (summed over micro-batches), then the updated weight on its way out
        self.staging = [[torch.empty(p.shape, dtype=p.dtype, pin_memory=pinned) for p in g["params"]]
                        for g in self.param_groups]
        # one fp32 gradient at a time, the size of the largest parameter
        self.scratch = torch.empty(max((p.numel() for p in params), default=0), dtype=torch.float32)
        self.host_step = host_step  # master_adam_host; tests pass its twin master_adam_torch
        self.where = {p: (g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])}
        self.received = set()  # (group, index) of the parameters with a gradient in staging for this step
        self.pending = []  # (host copy, staging buffer or None, event): gradients still on their way to the host
        self.stream = torch.cuda.Stream(self.device) if pinned else None
        for p in params:
            p.register_post_accumulate_grad_hook(self._gradient_ready)

    # ---------------------------------------------------------------- gradients leave the GPU

    def _gradient_ready(self, param: torch.Tensor) -> None:
        """The backward has accumulated this micro-batch's gradient of `param`: send it to the host, free it."""
        g, i = self.where[param]
        grad, param.grad = param.grad, None
        first = (g, i) not in self.received
        self.received.add((g, i))
        target = self.staging[g][i] if first else torch.empty(grad.shape, dtype=grad.dtype,
                                                              pin_memory=self.stream is not None)
        if self.stream is None:
            target.copy_(grad)
            event = None
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                target.copy_(grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            grad.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.pending.append((target, None if first else self.staging[g][i], event))
        self._add_arrived(wait=False)

    def _add_arrived(self, wait: bool) -> None:
        """Add the gradients that have reached the host to their staging buffers (all of them with `wait`)."""
        still = []
        for host, staging, event in self.pending:
            if event is not None and not event.query():
                if not wait:
                    still.append((host, staging, event))
                    continue
                event.synchronize()
            if staging is not None:
                staging.add_(host)  # bf16 + bf16, rounded to bf16: what autograd's accumulation in .grad computes
        self.pending = still

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._add_arrived(wait=True)
        if not self.received:
            return loss
        received = [(g, i) for g, group in enumerate(self.param_groups) for i in range(len(group["params"]))
                    if (g, i) in self.received]
        clip = self._clip_coefficient([self.staging[g][i] for g, i in received])
        # a parameter at a time, with no waiting: its weight goes to the GPU on the side stream while the next one
        # updates, and the next step's gradient copies into the same buffers queue behind them on that stream
        for g, i in received:
            group, staging = self.param_groups[g], self.staging[g][i]
            self.steps[g][i] += 1
            gradient = self.scratch[:staging.numel()].view(staging.shape).copy_(staging)
            if clip is not None:
                gradient.mul_(clip)
            self.host_step([staging], [gradient], [self.masters[g][i]], [self.exp_avgs[g][i]],
                           [self.exp_avg_sqs[g][i]], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                           weight_decay=group.get("weight_decay", 0.0), adamw=self.adamw, step=self.steps[g][i],
                           clip=None)
            self._upload([group["params"][i]], [staging])
        self.received.clear()
        return loss

    def _upload(self, params: list, weights: list) -> None:
        """Copy the updated bf16 weights (in their staging buffers) into the parameters: on the side stream, ordered
        before any later work on the current stream (the next forward)."""
        if self.stream is None:
            for param, weight in zip(params, weights):
                param.copy_(weight)
            return
        with torch.cuda.stream(self.stream):
            for param, weight in zip(params, weights):
                param.copy_(weight, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    # MasterWeightAdam keeps the same attributes: its clip coefficient, and its resume bundle's layout and restore
    _clip_coefficient = MasterWeightAdam._clip_coefficient
    state_dict = MasterWeightAdam.state_dict
    load_state_dict = MasterWeightAdam.load_state_dict
