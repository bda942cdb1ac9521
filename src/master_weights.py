"""Adam on fp32 master weights for a model that runs in bf16 (--precision bf16 without DeepSpeed).

The model's parameters are bf16: the forward and backward run on bf16 weights (no autocast casts, half the
activation bytes of an fp32 model under autocast). The optimizer keeps an fp32 copy of every trained parameter
and Adam's moments in fp32, as DeepSpeed's bf16 optimizers do, without DeepSpeed's per-parameter bookkeeping:

    step:  g32 = grad (bf16 -> fp32);  g32 *= min(1, max_norm / ||g32||)   (one norm over all parameters)
           master = Adam(master, g32);  param = bf16(master)

The gradients accumulate in the parameters' bf16 .grad over micro-batches (Lightning's accumulation), and the
clipping is done here, in fp32, instead of by Lightning (src/trainer.py routes --gradient_clip_val to it).
Memory per trained parameter: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (master) + 8 (moments), plus an fp32
gradient for one parameter group at a time during the step. Nothing here waits for the GPU.
"""
from typing import List

import torch


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam (or AdamW with weight_decay groups) over fp32 masters of the 16-bit parameters in `param_groups`.

    The groups keep the model's parameters, so whoever sets group["lr"] (the LR schedule) steers the step;
    each group may carry "lr_scale" and "weight_decay" like the groups of src/trainer.py build_param_groups.
    """

    def __init__(self, param_groups: List[dict], lr: float, betas: tuple, eps: float, adamw: bool,
                 max_grad_norm: float):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.max_grad_norm = max_grad_norm
        self.masters = [[p.detach().float() for p in group["params"]] for group in self.param_groups]
        fused = all(p.is_cuda for group in self.param_groups for p in group["params"]) or None
        inner_groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": masters}
                        for group, masters in zip(self.param_groups, self.masters)]
        self.inner = (torch.optim.AdamW if adamw else torch.optim.Adam)(inner_groups, lr=lr, betas=betas, eps=eps,
                                                                        fused=fused)

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
        clip = self._clip_coefficient(grads)
        for group, inner, pairs in zip(self.param_groups, self.inner.param_groups, stepped):
            if not pairs:
                continue
            params, masters = map(list, zip(*pairs))
            inner["lr"], inner["weight_decay"] = group["lr"], group.get("weight_decay", 0.0)
            master_grads = [p.grad.float() for p in params]  # this group's fp32 gradients only
            if clip is not None:
                torch._foreach_mul_(master_grads, clip)
            for master, grad in zip(masters, master_grads):
                master.grad = grad
            self.inner.step()  # updates the masters that have a gradient: this group's
            for master in masters:
                master.grad = None
            torch._foreach_copy_(params, masters)  # the bf16 weights the next forward uses
        return loss

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
