"""Adam on fp32 master weights for a model that runs in bf16 (--precision bf16 without DeepSpeed).

The model's parameters are bf16: the forward and backward run on bf16 weights (no autocast casts, half the
activation bytes of an fp32 model under autocast). The optimizer keeps an fp32 copy of every trained parameter
and Adam's moments in fp32, as DeepSpeed's bf16 optimizers do, without DeepSpeed's per-parameter bookkeeping:

    step:  clip = min(1, max_norm / ||grad||)   (one fp32 norm over all parameters' bf16 gradients)
           per group (src/optim/master_adam.py): master = Adam(master, fp32(grad) * clip);  param = bf16(master)

On CUDA a group's step is one kernel launch that reads each bf16 gradient once and writes master, moments and
bf16 weight; elsewhere (and if the kernel cannot be built) its PyTorch reference twin runs. The gradients
accumulate in the parameters' bf16 .grad over micro-batches (Lightning's accumulation), and the clipping is done
here, in fp32, instead of by Lightning (src/train/trainer.py routes --gradient_clip_val to it). Memory per trained
parameter: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (master) + 8 (moments); the kernel adds nothing, the reference
fp32 temporaries of one parameter. Nothing here waits for the GPU.
"""
from collections import defaultdict
from typing import List, Optional

import torch

from src.optim import master_adam


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam (or AdamW with weight_decay groups) over fp32 masters of the 16-bit parameters in `param_groups`.

    The groups keep the model's parameters, so whoever sets group["lr"] (the LR schedule) steers the step;
    each group may carry "lr_scale" and "weight_decay" like the groups of src/train/trainer.py build_param_groups.
    Each parameter counts its own steps, as torch's Adam does (one that had no gradient was not stepped).
    """

    def __init__(self, param_groups: List[dict], lr: float, betas: tuple, eps: float, adamw: bool,
                 max_grad_norm: float, fused: Optional[bool] = None):
        """fused: the CUDA kernel (None: when every parameter is on CUDA; False: the reference, for comparisons)."""
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.max_grad_norm, self.adamw = max_grad_norm, adamw
        self.masters = [[p.detach().float() for p in group["params"]] for group in self.param_groups]
        self.exp_avgs = [[torch.zeros_like(m) for m in masters] for masters in self.masters]
        self.exp_avg_sqs = [[torch.zeros_like(m) for m in masters] for masters in self.masters]
        self.steps = [[0] * len(masters) for masters in self.masters]
        on_cuda = all(p.is_cuda for group in self.param_groups for p in group["params"])
        self.adam_step = master_adam.choose(on_cuda if fused is None else fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        clip = self._clip_coefficient(grads)
        for g, group in enumerate(self.param_groups):
            # the parameters that received a gradient, by their step number (one launch each; normally one)
            by_step = defaultdict(list)
            for i, param in enumerate(group["params"]):
                if param.grad is not None:
                    self.steps[g][i] += 1
                    by_step[self.steps[g][i]].append(i)
            for step, indices in by_step.items():
                self.adam_step([group["params"][i] for i in indices], [group["params"][i].grad for i in indices],
                               [self.masters[g][i] for i in indices], [self.exp_avgs[g][i] for i in indices],
                               [self.exp_avg_sqs[g][i] for i in indices], lr=group["lr"], betas=group["betas"],
                               eps=group["eps"], weight_decay=group.get("weight_decay", 0.0), adamw=self.adamw,
                               step=step, clip=clip)
        return loss

    def _clip_coefficient(self, grads: List[torch.Tensor]):
        """min(1, max_norm / total norm) as a device tensor (no host sync), or None without clipping."""
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return None
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        return (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)

    def state_dict(self) -> dict:
        """The groups, the fp32 masters (the bf16 weights alone cannot restore them), the moments and step counts;
        like torch's optimizers, the tensors themselves (a checkpoint writer copies them), not copies."""
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "masters": self.masters, "exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """A state from `state_dict`, or from before the kernel (torch's Adam over the masters, under "inner")."""
        if "inner" in state:
            state = {**state, **_moments_of_torch_adam(state["inner"], self.masters)}
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        for name in ("masters", "exp_avgs", "exp_avg_sqs"):
            for mine, saved in zip(getattr(self, name), state[name]):
                for tensor, value in zip(mine, saved):
                    tensor.copy_(value)
        self.steps = [list(steps) for steps in state["steps"]]


def _moments_of_torch_adam(inner: dict, masters: List[List[torch.Tensor]]) -> dict:
    """Moments and step counts, per group and parameter, from the state_dict of torch's Adam over the masters that
    this optimizer kept before its step became one kernel (resume bundles written then hold it). torch numbers the
    parameters across the groups in order and has no state for one never stepped."""
    exp_avgs, exp_avg_sqs, steps, index = [], [], [], 0
    for group in masters:
        saved = [inner["state"].get(index + i, {}) for i in range(len(group))]
        index += len(group)
        exp_avgs.append([s.get("exp_avg", torch.zeros_like(m)) for s, m in zip(saved, group)])
        exp_avg_sqs.append([s.get("exp_avg_sq", torch.zeros_like(m)) for s, m in zip(saved, group)])
        steps.append([int(s["step"]) if s else 0 for s in saved])
    return {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
