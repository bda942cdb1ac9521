"""Before training: can this machine hold the run's weights, gradients and optimizer state at all?

A run that plainly cannot fit is refused with one line naming the numbers and the ways out, instead of an
out-of-memory traceback from inside DeepSpeed minutes later. Activations (which depend on ctx_len,
--grad_cp, --state_cp) come on top of the estimate, so passing the check is no promise; failing it is
certain. Bytes per parameter (P all parameters, T the trainable ones, W GPUs; DeepSpeed's own ZeRO figures):

    strategy                      GPU, per process                         host, per machine
    auto/ddp                      4 P + 4 T + 8 T  (weights, grads, Adam)  -
    auto/ddp, bf16                2 P + 2 T + 12 T (bf16 weights and grads, fp32 masters, Adam) + 4 x one group
    deepspeed_stage_1, 16-bit     2 P + 2 T + 12 T / W                     -
    deepspeed_stage_2, 16-bit     2 P + (2 + 12) T / W                     -
    deepspeed_stage_2_offload     2 P                                      16 T (fp32 master, Adam, grads)
    deepspeed_stage_3, 16-bit     (2 P + 14 T) / W                         -
    deepspeed_stage_3_offload     -                                        2 P + 16 T
(DeepSpeed's partitions are per process: a machine holds its processes' share, processes / W of the total.)
DeepSpeed with fp32 weights keeps 4 bytes where the table says 2. On a CPU-only run the host holds what
the first row puts on the GPU.
"""
from dataclasses import dataclass
from typing import Optional

from src.config import TrainConfig
from src.errors import UserInputError

GIB = 2 ** 30
# Optimizer parameter groups are cut to at most this many elements (src/trainer.py), 512 MiB in bf16: DeepSpeed's
# ZeRO 1/2 set-up copies each group whole on the GPU before moving its fp32 master copy to where it lives
# (stage_1_and_2.py: `partition.detach().clone().to(device)`), so with one group of a 7B model the card would
# briefly hold the weights twice; the master-weight optimizer converts one group's gradients to fp32 at a time.
OPTIMIZER_GROUP_NUMEL = 2 ** 28


@dataclass(frozen=True)
class Footprint:
    gpu: int  # bytes on each GPU (0 for a CPU run)
    host: int  # bytes on each machine, all its processes together


def footprint(cfg: TrainConfig, params: int, trainable: int, world_size: int, processes_per_host: int,
              on_gpu: bool) -> Footprint:
    """The weights, gradients and optimizer state of the run (see the module docstring)."""
    if cfg.deepspeed is None:
        if cfg.master_weights:  # bf16 weights and gradients, fp32 masters and Adam, one group's fp32 gradients
            state = 2 * params + 14 * trainable + 4 * min(trainable, OPTIMIZER_GROUP_NUMEL)
        else:  # fp32 weights (fp16 mixed precision keeps them too), gradients, Adam
            state = 4 * params + 12 * trainable
        return Footprint(gpu=state, host=0) if on_gpu else Footprint(gpu=0, host=state * processes_per_host)
    weight = 2 if cfg.precision in ("bf16", "fp16") else 4
    stage, offload = cfg.deepspeed
    if stage == 3:
        if offload:
            return Footprint(gpu=0, host=(weight * params + 16 * trainable) * processes_per_host // world_size)
        return Footprint(gpu=(weight * params + (weight + 12) * trainable) // world_size, host=0)
    if offload:
        return Footprint(gpu=weight * params, host=16 * trainable * processes_per_host // world_size)
    grads = weight * trainable if stage == 1 else weight * trainable // world_size
    return Footprint(gpu=weight * params + grads + 12 * trainable // world_size, host=0)


def check_fits(cfg: TrainConfig, need: Footprint, gpu_free: Optional[int], host_available: Optional[int]) -> None:
    """Refuse the run when the footprint alone exceeds the free GPU memory or the host's available memory
    (None: not known here, not checked)."""
    if gpu_free is not None and need.gpu > gpu_free:
        raise UserInputError(
            f"--strategy {cfg.strategy} --precision {cfg.precision}: the weights, gradients and optimizer state "
            f"alone need {need.gpu / GIB:.1f} GiB per GPU, and this GPU has {gpu_free / GIB:.1f} GiB free; use "
            f"deepspeed_stage_2_offload (optimizer in host memory), --lora, more GPUs, or a smaller model.")
    if host_available is not None and need.host > host_available:
        where = "the optimizer state offloaded to host memory" if need.gpu else "the weights, gradients and Adam state"
        raise UserInputError(
            f"--strategy {cfg.strategy}: {where} need {need.host / GIB:.1f} GiB of host memory on this machine, and "
            f"{host_available / GIB:.1f} GiB are available; use a machine with more memory, more machines, --lora, "
            f"or a smaller model.")


def available_host_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where the system does not tell)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
