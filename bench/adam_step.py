"""The master-weight optimizer's step (bf16 model, fp32 masters and Adam) at a model's parameter shapes.

For each shape: the bf16 parameters of that RWKV-4 model with random gradients, in train.py's optimizer groups
(--layerwise_lr 1, groups of at most 2^28 elements), stepped with gradient clipping (--gradient_clip_val 1.0). Rows:
- ours kernel: MasterWeightAdam as train.py runs it (src/optim/cuda/master_adam.cu: one launch per optimizer group);
- ours reference: the same optimizer running the reference step, one PyTorch kernel per operation and tensor;
- torch fused Adam: torch's own fused Adam on the fp32 masters, after converting each group's gradients to fp32
  and clipping them (what MasterWeightAdam did before the kernel);
- limit: the bytes a step must move (28 per parameter, and 2 for the clipping norm's read of the gradients)
  at the device-to-device copy bandwidth measured in this run.
GPU ms: CUDA events around back-to-back steps; host ms: the time the step takes to issue its work (where it
exceeds the GPU ms, the host bounds the step). Peak: memory the step allocates beyond the optimizer's state.

    python -m bench.adam_step                      # L24-D1024 and L32-D4096
    python -m bench.adam_step --shapes L32-D4096
"""
import argparse
import statistics
import time

import torch

from bench.common import copy_bandwidth, print_run_header
from src.config import parse_args
from src.optim.master_weights import MasterWeightAdam
from src.train.memory_check import OPTIMIZER_GROUP_NUMEL
from src.models.rwkv4.config import RWKVConfig
from src.models.rwkv4.model import RWKV
from src.train.trainer import build_param_groups

SHAPES = {"L24-D1024": (24, 1024), "L32-D4096": (32, 4096)}
SETTINGS = dict(lr=1e-5, betas=(0.9, 0.99), eps=1e-8)
BYTES_PER_PARAMETER = 28 + 2


def bf16_parameters(n_layer: int, n_embd: int) -> torch.nn.Module:
    """The model's parameters in bf16 on the GPU (random values), each with a random bf16 gradient."""
    with torch.device("meta"):
        model = RWKV(RWKVConfig(vocab_size=50277, n_layer=n_layer, n_embd=n_embd))
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
        p.grad = torch.randn_like(p) * 1e-3
    return model


class TorchFusedAdamOnMasters:
    """torch's fused Adam over fp32 masters: each group's gradients converted to fp32 and clipped, then copied
    back to the bf16 weights. The comparison row, not used in training."""

    def __init__(self, groups: list, max_grad_norm: float):
        self.groups, self.max_grad_norm = groups, max_grad_norm
        self.masters = [[p.detach().float() for p in group["params"]] for group in groups]
        self.adam = torch.optim.Adam([{"params": m, "lr": group["lr"]} for group, m in zip(groups, self.masters)],
                                     **SETTINGS, fused=True)

    @torch.no_grad()
    def step(self):
        grads = [p.grad for group in self.groups for p in group["params"]]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for group, masters in zip(self.groups, self.masters):
            fp32_grads = [p.grad.float() for p in group["params"]]
            torch._foreach_mul_(fp32_grads, clip)
            for master, grad in zip(masters, fp32_grads):
                master.grad = grad
            self.adam.step()
            for master in masters:
                master.grad = None
            torch._foreach_copy_(group["params"], masters)


def time_steps(optimizer, steps: int = 5) -> dict:
    """GPU and host milliseconds per step after two warm-up steps (the kernel's build, state), and the step's own
    peak."""
    for _ in range(2):
        optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = []
    start.record()
    for _ in range(steps):
        began = time.perf_counter()
        optimizer.step()
        host.append((time.perf_counter() - began) * 1e3)
    end.record()
    torch.cuda.synchronize()
    return {"gpu_ms": start.elapsed_time(end) / steps, "host_ms": statistics.median(host),
            "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2 ** 30}


def bench_shape(shape: str, bandwidth: float) -> list:
    model = bf16_parameters(*SHAPES[shape])
    cfg = parse_args(["--data_type", "dummy", "--layerwise_lr", "1", "--precision", "bf16"])
    groups = build_param_groups(model, cfg, OPTIMIZER_GROUP_NUMEL)
    for group in groups:
        group.pop("names")
        group["lr"] = SETTINGS["lr"] * group["lr_scale"]
    params = sum(p.numel() for group in groups for p in group["params"])
    rows = []
    for name, make in (("ours kernel", lambda: MasterWeightAdam(groups, **SETTINGS, adamw=False, max_grad_norm=1.0)),
                       ("ours reference", lambda: MasterWeightAdam(groups, **SETTINGS, adamw=False,
                                                                   max_grad_norm=1.0, fused=False)),
                       ("torch fused Adam", lambda: TorchFusedAdamOnMasters(groups, max_grad_norm=1.0))):
        optimizer = make()
        rows.append({"shape": shape, "optimizer": name, "params": params, **time_steps(optimizer)})
        del optimizer
        torch.cuda.empty_cache()
    limit_ms = BYTES_PER_PARAMETER * params / bandwidth * 1e3
    rows.append({"shape": shape, "optimizer": "limit", "params": params, "gpu_ms": limit_ms, "host_ms": None,
                 "peak_gib": None})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args(argv)
    print_run_header("bench.adam_step", argv)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s\n")
    print("| shape | parameters | optimizer | GPU ms / step | host ms / step | of the limit | step's own peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        rows = bench_shape(shape, bandwidth)
        limit = rows[-1]["gpu_ms"]
        for r in rows:
            host = "-" if r["host_ms"] is None else f"{r['host_ms']:.1f}"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"| {r['shape']} | {r['params'] / 1e9:.2f}e9 | {r['optimizer']} | {r['gpu_ms']:.1f} | {host} | "
                  f"{limit / r['gpu_ms']:.0%} | {peak} |")
    print(f"\nlimit: {BYTES_PER_PARAMETER} bytes per parameter (read the bf16 gradient for the norm, then the "
          f"gradient, master and moments; write master, moments and the bf16 weight) at the copy bandwidth")


if __name__ == "__main__":
    main()
