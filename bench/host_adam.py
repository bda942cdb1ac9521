"""The host's Adam step for --strategy offload: which CPU Adam to run, measured on the machine's own cores.

Every row does the step HostOffloadAdam does per parameter, on the same tensors: the bf16 gradient (its pinned
staging buffer) to fp32 times the clip coefficient, Adam(W) on the fp32 master and moments, and the master rounded
into the bf16 staging buffer that goes back to the GPU. Rows differ in the Adam in the middle:
- ours reference: src/optim/master_adam.py master_adam_torch, one PyTorch operation at a time (the twin);
- torch fused: torch.optim.adam.adam(fused=True), torch's vectorised one-pass CPU kernel;
- DeepSpeedCPUAdam: DeepSpeed's AVX kernel (built on first use; the build time is printed apart);
- torchao CPUOffloadOptimizer: only its step time on a bf16 model of the same size on the GPU (it moves gradients
  and weights itself); its master is the model's own bf16 weight, so it cannot give --strategy auto's numerics;
- limit: the 28 bytes a parameter's step must move (read bf16 gradient, fp32 master and moments; write them and
  the bf16 weight) at the host's copy bandwidth measured in this run.
The 7B column scales each row to 7.39e9 parameters (L32 D4096 vocab 50277).

    python -m bench.host_adam                       # 2^30 parameters in tensors of 2^26
    python -m bench.host_adam --log2_params 28
"""
import argparse
import statistics
import time
from typing import Callable, List

import torch
from torch.optim.adam import adam

from src.optim.master_adam import master_adam_torch

SEVEN_B = 7.39e9
BYTES_PER_PARAMETER = 28
SETTINGS = dict(lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, adamw=True)


class HostState:
    """Tensors of a step: bf16 staging buffers with gradients, fp32 masters and moments."""

    def __init__(self, total: int, per_tensor: int):
        count = total // per_tensor
        self.staging = [(torch.randn(per_tensor) * 1e-3).bfloat16().pin_memory() if torch.cuda.is_available()
                        else (torch.randn(per_tensor) * 1e-3).bfloat16() for _ in range(count)]
        self.masters = [torch.randn(per_tensor) * 0.02 for _ in range(count)]
        self.exp_avgs = [torch.zeros(per_tensor) for _ in range(count)]
        self.exp_avg_sqs = [torch.zeros(per_tensor) for _ in range(count)]
        self.scratch = torch.empty(per_tensor)  # the fp32 gradient of one tensor at a time
        self.clip = torch.tensor(0.5)

    def fp32_gradient(self, index: int) -> torch.Tensor:
        return self.scratch.copy_(self.staging[index]).mul_(self.clip)


def reference_step(state: HostState, step: int) -> None:
    for i in range(len(state.masters)):
        master_adam_torch([state.staging[i]], [state.staging[i]], [state.masters[i]], [state.exp_avgs[i]],
                          [state.exp_avg_sqs[i]], **SETTINGS, step=step, clip=state.clip)


def torch_fused_step(state: HostState, step: int) -> None:
    beta1, beta2 = SETTINGS["betas"]
    for i in range(len(state.masters)):
        adam([state.masters[i]], [state.fp32_gradient(i)], [state.exp_avgs[i]], [state.exp_avg_sqs[i]], [],
             [torch.tensor(float(step - 1))], fused=True, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
             beta2=beta2, lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"], eps=SETTINGS["eps"],
             maximize=False)
        state.staging[i].copy_(state.masters[i])


def deepspeed_step_function() -> Callable:
    """DeepSpeed's CPU Adam kernel as a step over HostState (its build time printed)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    started = time.perf_counter()
    module = CPUAdamBuilder().load()
    print(f"DeepSpeedCPUAdam built or loaded in {time.perf_counter() - started:.1f} s", flush=True)
    beta1, beta2 = SETTINGS["betas"]
    module.create_adam(0, SETTINGS["lr"], beta1, beta2, SETTINGS["eps"], SETTINGS["weight_decay"], True, False)

    def step_(state: HostState, step: int) -> None:
        for i in range(len(state.masters)):
            module.adam_update(0, step, SETTINGS["lr"], beta1, beta2, SETTINGS["eps"], SETTINGS["weight_decay"],
                               True, state.masters[i], state.fp32_gradient(i), state.exp_avgs[i],
                               state.exp_avg_sqs[i])
            state.staging[i].copy_(state.masters[i])
    return step_


def torchao_seconds(total: int, per_tensor: int, steps: int) -> List[float]:
    """Step times of torchao's CPUOffloadOptimizer (torch's fused AdamW inside) over bf16 GPU parameters: from the
    gradients' arrival (their copy to the host) to the updated weights back on the GPU."""
    from torchao.optim import CPUOffloadOptimizer

    params = [torch.nn.Parameter(torch.randn(per_tensor, device="cuda", dtype=torch.bfloat16) * 0.02)
              for _ in range(total // per_tensor)]
    optimizer = CPUOffloadOptimizer(params, torch.optim.AdamW, fused=True, lr=SETTINGS["lr"],
                                    betas=SETTINGS["betas"], weight_decay=SETTINGS["weight_decay"])
    seconds = []
    for _ in range(steps):
        gradients = [torch.randn_like(p) * 1e-3 for p in params]
        torch.cuda.synchronize()
        started = time.perf_counter()
        # gradients must arrive through autograd: its post-accumulate hooks copy them to the host and queue the
        # parameter for step(), which steps only queued ones (a .grad set by hand made the row time nothing)
        torch.autograd.backward(params, gradients)
        optimizer.step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        optimizer.zero_grad()
    return seconds


def timed(step_: Callable, state: HostState, steps: int) -> List[float]:
    seconds = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        step_(state, step)
        seconds.append(time.perf_counter() - started)
    return seconds


def copy_bandwidth(numel: int = 1 << 28) -> float:
    """Bytes per second of an fp32 host copy (read + write), the best of 3."""
    source, target = torch.randn(numel), torch.empty(numel)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * 4 * numel / best


def row(name: str, seconds: List[float], total: int, limit_seconds: float) -> str:
    median = statistics.median(seconds[1:] if len(seconds) > 1 else seconds)
    per_7b = median * SEVEN_B / total
    steps = " ".join(f"{s:.2f}" for s in seconds)
    return (f"| {name} | {median * 1e3:,.0f} | {total / median / 1e9:.2f} | {per_7b:.2f} | "
            f"{limit_seconds / median:.2f} | {steps} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2_params", type=int, default=30, help="parameters in all (a power of 2)")
    parser.add_argument("--log2_tensor", type=int, default=26, help="parameters per tensor")
    parser.add_argument("--steps", type=int, default=4, help="steps per row (the median leaves out the first)")
    args = parser.parse_args(argv)
    total, per_tensor = 1 << args.log2_params, 1 << args.log2_tensor
    print(f"host threads {torch.get_num_threads()}, {total:,} parameters in tensors of {per_tensor:,}", flush=True)
    bandwidth = copy_bandwidth()
    limit = BYTES_PER_PARAMETER * total / bandwidth
    state = HostState(total, per_tensor)
    print("| CPU Adam | ms per step | 1e9 params/s | s per 7B step | of the limit | each step's s |")
    print("|---|---|---|---|---|---|")
    print(f"| limit: {BYTES_PER_PARAMETER} B/param at {bandwidth / 1e9:.1f} GB/s copy | {limit * 1e3:,.0f} | "
          f"{total / limit / 1e9:.2f} | {limit * SEVEN_B / total:.2f} | 1.00 | |", flush=True)
    rows = [("ours reference (master_adam_torch)", reference_step), ("torch fused (adam fused=True)", torch_fused_step)]
    try:
        rows.append(("DeepSpeedCPUAdam", deepspeed_step_function()))
    except Exception as exc:  # a missing deepspeed or a failed build is reported, and the other rows still run
        print(f"| DeepSpeedCPUAdam | not run: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} |")
    for name, step_ in rows:
        print(row(name, timed(step_, state, args.steps), total, limit), flush=True)
    del state
    if torch.cuda.is_available():
        try:
            print(row("torchao CPUOffloadOptimizer (bf16 master, D2H/H2D included)",
                      torchao_seconds(total, per_tensor, args.steps), total, limit), flush=True)
        except Exception as exc:
            print(f"| torchao CPUOffloadOptimizer | not run: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
