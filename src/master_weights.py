"""Adam on fp32 master weights for a model that runs in bf16 (--precision bf16 without DeepSpeed).

The model's parameters are bf16: the forward and backward run on bf16 weights (no autocast casts, half the
activation bytes of an fp32 model under autocast). The optimizer keeps an fp32 copy of every trained parameter
and Adam's moments in fp32, as DeepSpeed's bf16 optimizers do, without DeepSpeed's per-parameter bookkeeping:

    step:  clip = min(1, max_norm / ||grad||)   (one fp32 norm over all parameters' bf16 gradients)
           per parameter (src/adam_step.py): master = Adam(master, fp32(grad) * clip);  param = bf16(master)

The gradients accumulate in the parameters' bf16 .grad over micro-batches (Lightning's accumulation), and the
clipping is done here, in fp32, instead of by Lightning (src/trainer.py routes --gradient_clip_val to it).
Memory per trained parameter: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (master) + 8 (moments); on CUDA the step
adds nothing (one kernel per parameter, its intermediates in registers). Nothing here waits for the GPU.
"""
from typing import List, Optional

import torch

from src.adam_step import step_function


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam (or AdamW with weight_decay groups) over fp32 masters of the 16-bit parameters in `param_groups`.

    The groups keep the model's parameters, so whoever sets group["lr"] (the LR schedule) steers the step;
    each group may carry "lr_scale" and "weight_decay" like the groups of src/trainer.py build_param_groups.
    torch's Adam over the masters holds the moments and step counts (its state_dict is the format resume bundles
    keep); the step itself is src/adam_step.py's, one fused kernel per parameter on CUDA.
    """

    def __init__(self, param_groups: List[dict], lr: float, betas: tuple, eps: float, adamw: bool,
                 max_grad_norm: float, fused: Optional[bool] = None):
        """fused: the compiled step (None: on CUDA, where it runs; False: the reference, for comparisons)."""
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.max_grad_norm = max_grad_norm
        self.adamw = adamw
        self.masters = [[p.detach().float() for p in group["params"]] for group in self.param_groups]
        self.on_cuda = all(p.is_cuda for group in self.param_groups for p in group["params"])
        self.step_one = step_function(self.on_cuda if fused is None else fused)
        inner_groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": masters}
                        for group, masters in zip(self.param_groups, self.masters)]
        # fused: where torch keeps the step counts (on the masters' device, which the fused step reads them from)
        self.inner = (torch.optim.AdamW if adamw else torch.optim.Adam)(inner_groups, lr=lr, betas=betas, eps=eps,
                                                                        fused=self.on_cuda or None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # per group, (16-bit parameter, its fp32 master) for the parameters that received a gradient
        stepped = [[(p, m) for p, m in zip(group["params"], masters) if p.grad is not None]
                   for group, masters in zip(self.param_groups, self.masters)]
        grads = [p.grad for pairs in stepped for p, _ in pairs]
        if not grads:
            return loss
        device = grads[0].device
        clip = self._clip_coefficient(grads)
        clip = torch.ones((), device=device) if clip is None else clip
        for group, inner, pairs in zip(self.param_groups, self.inner.param_groups, stepped):
            if not pairs:
                continue
            states = [self._state_of(master) for _, master in pairs]
            torch._foreach_add_([state["step"] for state in states], 1.0)
            # 0-d tensors on the device: a new LR each step costs a fill, not a copy the host waits for
            lr = torch.full((), group["lr"], device=device)
            weight_decay = torch.full((), group.get("weight_decay", 0.0), device=device)
            beta1, beta2 = inner["betas"]
            for (param, master), state in zip(pairs, states):
                # 1-D views (view, not reshape: the step writes through them into the tensors themselves)
                self.step_one(param.view(-1), param.grad.reshape(-1), master.view(-1), state["exp_avg"].view(-1),
                              state["exp_avg_sq"].view(-1), state["step"], lr, weight_decay, clip,
                              beta1=beta1, beta2=beta2, eps=inner["eps"], decoupled=self.adamw)
        return loss

    def _state_of(self, master: torch.Tensor) -> dict:
        """torch's Adam state of one master (made at its first step, as torch's Adam makes it)."""
        state = self.inner.state[master]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    def _clip_coefficient(self, grads: List[torch.Tensor]):
        """min(1, max_norm / total norm) as a device tensor (no host sync), or None without clipping."""
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return None
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        return (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)

    def state_dict(self) -> dict:
        """Adam's state and the fp32 masters (the bf16 weights alone cannot restore them), plus the groups; like
        torch's optimizers, the tensors themselves (a checkpoint writer copies them), not copies."""
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "inner": self.inner.state_dict(), "masters": self.masters}

    def load_state_dict(self, state: dict) -> None:
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        for masters, saved in zip(self.masters, state["masters"]):
            for master, value in zip(masters, saved):
                master.copy_(value)
        self.inner.load_state_dict(state["inner"])
