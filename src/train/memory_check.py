"""Before training: can this machine hold the run? Refused in one line, before anything large is allocated.

A run that cannot fit is refused with one line naming the numbers and the ways out, instead of an out-of-memory
traceback from inside DeepSpeed minutes later, or the kernel killing the process when the host runs out.

The state (`footprint`): bytes per parameter (P all parameters, T the trainable ones, W GPUs):

    strategy                      GPU, per process                         host, per machine
    auto/ddp                      4 P + 4 T + 8 T  (weights, grads, Adam)  -
    auto/ddp, bf16                2 P + 2 T + 12 T (bf16 weights and grads, fp32 masters, Adam); on a CPU the
                                  reference step's fp32 temporaries of one parameter too (8 x at most one group)
    deepspeed_stage_1, 16-bit     2 P + 2 T + 12 T / W                     -
    deepspeed_stage_2, 16-bit     2 P + (2 + 12) T / W                     -
    deepspeed_stage_2_offload     2 P                                      20 T (fp32 master, Adam, fp32 grads, a
                                                                           16-bit copy the weights are staged in: 18;
                                                                           2 more: a margin, not attributed)
    deepspeed_stage_3, 16-bit     (2 P + 14 T) / W                         -
    deepspeed_stage_3_offload     -                                        2 P + 16 T
    offload (bf16, one GPU)       2 P                                      14 T (fp32 master, Adam, a bf16 buffer the
                                                                           gradient arrives in and the weight leaves)
(DeepSpeed's partitions are per process: a machine holds its processes' share, processes / W of the total.)
DeepSpeed with fp32 weights keeps 4 bytes where the table says 2. On a CPU-only run the host holds what
the first row puts on the GPU. 18 of the 20 bytes of ZeRO-1/2 offload are DeepSpeed's stage_1_and_2.py buffers
(single_partition_of_fp32_groups, their .grad, Adam's two moments, param_buffer_of_bit16_for_cpu_offload_groups);
the other 2 are a margin for what the process holds beyond them (OFFLOAD_UNATTRIBUTED_BYTES). With 18 a
7.39e9-parameter model needs 123.9 GiB, which the 125 GiB of a 128 GiB machine cannot hold next to the process itself.

The whole run (`run_footprint`) adds what training holds beside the state: on the GPU the activations (the
model's estimate for the samples, --grad_cp and --state_cp), DeepSpeed's buffers (two gradient buckets;
with offload a 16-bit and an fp64 copy of the largest gradient, the latter for its norm) and the CUDA libraries'
memory outside PyTorch's allocator; on the host each process's own memory (Python, torch, the CUDA runtime).
BENCHMARKS.md puts these estimates beside measured peaks.

The check takes train.py's whole config (src/config.py): it reads the model's shape, the context and segments, the
precision, the strategy and LoRA flags, about twenty of them.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from src import models
from src.config import TrainConfig
from src.errors import UserInputError

GIB = 2 ** 30
# Optimizer parameter groups are cut to at most this many elements (src/train/trainer.py), 512 MiB in bf16: DeepSpeed's
# ZeRO 1/2 set-up copies each group whole on the GPU before moving its fp32 master copy to where it lives
# (stage_1_and_2.py: `partition.detach().clone().to(device)`), so with one group of a 7B model the card would
# briefly hold the weights twice. The size also bounds the fp32 temporaries of one parameter in the master-weight
# optimizer's reference step (src/optim/master_adam.py): the fork's largest parameter, the 14B's emb (50277 x 5120), is
# smaller.
OPTIMIZER_GROUP_NUMEL = 2 ** 28


# Host memory of one training process beside the weights and optimizer state: Python, torch, Lightning and, on a
# GPU, the CUDA runtime's host side (BENCHMARKS.md has the measured figures).
PROCESS_HOST_BYTES = {True: 5 * GIB, False: 1 * GIB}  # a GPU process, a CPU-only process
# GPU memory a training process takes outside PyTorch's allocator after the check has read the free memory: cuBLAS
# handles and workspaces (one per stream and per autograd thread), NCCL's buffers, loaded kernels; not the CUDA
# context, which already exists when the check runs (BENCHMARKS.md has the measured figures).
PROCESS_GPU_RUNTIME_BYTES = 1 * GIB


# Host bytes per trained parameter that a ZeRO-1/2 offload run's training process holds beyond DeepSpeed's 18 and
# the process's own memory, not attributed to one allocation: a margin above the 0.9-1.5 bytes measured (PSS of the
# training process, BENCHMARKS.md).
OFFLOAD_UNATTRIBUTED_BYTES = 2
# DeepSpeed ZeRO-1/2 offload's host bytes per trained parameter (see the module docstring)
OFFLOAD_HOST_BYTES = 18 + OFFLOAD_UNATTRIBUTED_BYTES
# --strategy offload's host bytes per trained parameter (src/optim/host_offload.py): fp32 master and moments, a bf16
# staging buffer. Not yet measured on a GPU machine: no margin is added.
OFFLOAD_STRATEGY_HOST_BYTES = 14


@dataclass(frozen=True)
class Footprint:
    gpu: int  # bytes on each GPU (0 for a CPU run)
    host: int  # bytes on each machine, all its processes together
    gpu_parts: str = "the weights, gradients and optimizer state alone"  # what `gpu` counts, for messages
    host_parts: str = ""


def _element_bytes(cfg: TrainConfig) -> int:
    """Bytes of a 16-bit run's weights, gradients and activations (bf16, fp16), else of fp32 ones."""
    return 2 if cfg.precision in ("bf16", "fp16") else 4


def footprint(cfg: TrainConfig, params: int, trainable: int, world_size: int, processes_per_host: int,
              on_gpu: bool) -> Footprint:
    """The weights, gradients and optimizer state of the run (see the module docstring)."""
    if cfg.offload:
        return Footprint(gpu=2 * params, host=OFFLOAD_STRATEGY_HOST_BYTES * trainable * processes_per_host)
    if cfg.deepspeed is None:
        if cfg.master_weights:  # bf16 weights and gradients, fp32 masters and Adam (+ the reference step's temporaries)
            state = 2 * params + 14 * trainable + (0 if on_gpu else 8 * min(trainable, OPTIMIZER_GROUP_NUMEL))
        else:  # fp32 weights (fp16 mixed precision keeps them too), gradients, Adam
            state = 4 * params + 12 * trainable
        return Footprint(gpu=state, host=0) if on_gpu else Footprint(gpu=0, host=state * processes_per_host)
    weight = _element_bytes(cfg)
    stage, offload = cfg.deepspeed
    if stage == 3:
        if offload:
            return Footprint(gpu=0, host=(weight * params + 16 * trainable) * processes_per_host // world_size)
        return Footprint(gpu=(weight * params + (weight + 12) * trainable) // world_size, host=0)
    if offload:
        return Footprint(gpu=weight * params,
                         host=OFFLOAD_HOST_BYTES * trainable * processes_per_host // world_size)
    grads = weight * trainable if stage == 1 else weight * trainable // world_size
    return Footprint(gpu=weight * params + grads + 12 * trainable // world_size, host=0)


def deepspeed_bucket_elements(cfg: TrainConfig, trainable: int, world_size: int) -> int:
    """Elements of each of DeepSpeed's reduce and allgather buckets (src/train/strategy.py sets them): --ds_bucket_mb MB
    of gradients in the run's dtype. Under --lora the gradients are few, and a bucket of 200 MB held mostly nothing
    (DeepSpeed allocates its buckets whole): on one GPU, which reduces with nobody, one bucket of the trainable count
    holds every gradient (one flush per step); on several, no more than the trainable count either."""
    flag = cfg.ds_bucket_mb * 1000 * 1000 // _element_bytes(cfg)
    if not cfg.lora:
        return flag
    return trainable if world_size == 1 else min(trainable, flag)


def deepspeed_gpu_buffers(cfg: TrainConfig, largest_trainable: int, trainable: int, world_size: int) -> int:
    """GPU bytes DeepSpeed ZeRO 1/2 allocates beside the weights: two gradient buckets (contiguous gradients,
    overlapped communication) of deepspeed_bucket_elements and, with the optimizer offloaded, a 16-bit copy of the
    largest gradient on its way to the host and an fp64 copy of it for its norm (stage_1_and_2.py
    set_norm_for_param_grad_in_gpu). Under --strategy offload: bf16 gradients on their way to the host, counted as two
    of the largest."""
    if cfg.offload:
        return 2 * 2 * largest_trainable
    if cfg.deepspeed is None or cfg.deepspeed[0] == 3:
        return 0
    buckets = 2 * deepspeed_bucket_elements(cfg, trainable, world_size) * _element_bytes(cfg)
    return buckets + ((2 + 8) * largest_trainable if cfg.deepspeed[1] else 0)


BUFFERS_OF = {False: "DeepSpeed buffers", True: "gradients on their way to the host"}  # by cfg.offload


def run_footprint(cfg: TrainConfig, state: Footprint, trained: tuple, activations: int, on_gpu: bool,
                  processes_per_host: int, world_size: int) -> Footprint:
    """The whole run: the state, plus on the GPU the activations (bytes, the model's estimate) and DeepSpeed's
    buffers, plus on the host each process's own memory (see the module docstring). `trained`: the number of elements
    of each trained parameter."""
    largest_trainable = max(trained, default=0)
    buffers = deepspeed_gpu_buffers(cfg, largest_trainable, sum(trained), world_size)
    process = PROCESS_HOST_BYTES[on_gpu] * processes_per_host
    processes = (f"{process / GIB:.0f} GiB per process" if processes_per_host == 1 else
                 f"{process / GIB:.0f} GiB for its {processes_per_host} processes")
    if not on_gpu:  # the host is the device
        return Footprint(gpu=0, host=state.host + activations + process,
                         host_parts=f"{state.host / GIB:.1f} GiB of weights, gradients and optimizer state, "
                                    f"{activations / GIB:.1f} GiB of activations, {processes}")
    runtime = PROCESS_GPU_RUNTIME_BYTES
    scratch = 4 * largest_trainable if cfg.offload else 0  # HostOffloadAdam's fp32 gradient of one parameter
    rounding = pinned_rounding_bytes(trained) if cfg.offload else 0
    return Footprint(
        gpu=state.gpu + activations + buffers + runtime, host=state.host + scratch + rounding + process,
        gpu_parts=f"{state.gpu / GIB:.1f} GiB of weights, gradients and optimizer state, {activations / GIB:.1f} GiB "
                  f"of activations" + (f", {buffers / GIB:.1f} GiB of {BUFFERS_OF[cfg.offload]}" if buffers else "")
                  + f", {runtime / GIB:.0f} GiB for the CUDA libraries",
        host_parts=(f"{state.host / GIB:.1f} GiB of offloaded optimizer state, " if state.host else "")
        + (f"{scratch / GIB:.1f} GiB for one fp32 gradient, " if scratch else "")
        + (f"{rounding / GIB:.1f} GiB of pinned-memory rounding, " if rounding else "") + processes)


def pinned_rounding_bytes(trained: tuple) -> int:
    """What torch's pinned-memory allocator adds to --strategy offload's bf16 staging buffers, one per trained
    parameter of `trained` elements: it rounds every allocation up to a power of two (c10's CachingHostAllocator, by
    default at any size), so a 3584 x 3584 buffer (24.5 MiB) takes 32 MiB; 4096-wide matrices lose nothing."""
    return sum((1 << (2 * n - 1).bit_length()) - 2 * n for n in trained if n)


def check_fits(cfg: TrainConfig, need: Footprint, gpu_free: Optional[int], host_available: Optional[int],
               lean_alternative: Optional[Footprint] = None) -> None:
    """Refuse the run when it needs more than the free GPU memory or the host's available memory (None: not known
    here, not checked). `lean_alternative`: what the same run needs under --strategy offload, named in a DeepSpeed
    offload run's refusal where it fits."""
    if gpu_free is not None and need.gpu > gpu_free:
        raise UserInputError(
            f"--strategy {cfg.strategy} --precision {cfg.precision}: this run needs {need.gpu / GIB:.1f} GiB per GPU "
            f"({need.gpu_parts}), and this GPU has {gpu_free / GIB:.1f} GiB free; use deepspeed_stage_2_offload "
            f"(optimizer in host memory), --grad_cp 1, a smaller --micro_bsz or --ctx_len (or --state_cp 1), --lora, "
            f"more GPUs, or a smaller model.")
    if host_available is not None and need.host > host_available:
        where = "the optimizer state offloaded to host memory" if need.gpu else "the weights, gradients and Adam state"
        parts = f" ({need.host_parts})" if need.host_parts else ""
        lean = lean_alternative
        instead = (f"--strategy offload (one GPU: {lean.host / GIB:.1f} GiB of host memory, {lean.gpu / GIB:.1f} "
                   f"GiB of GPU memory), " if lean and lean.host <= host_available
                   and (gpu_free is None or lean.gpu <= gpu_free) else "")
        raise UserInputError(
            f"--strategy {cfg.strategy}: {where} need {need.host / GIB:.1f} GiB of host memory on this machine"
            f"{parts}, and {host_available / GIB:.1f} GiB are available; use {instead}a machine with more memory, "
            f"more machines, --lora, or a smaller model.")


def available_host_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where the system does not tell)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_run(cfg: TrainConfig, vocab_size: int, lightning_trainer) -> None:
    """Refuse a run that this machine's free GPU memory or available host memory cannot hold."""
    import torch

    device = lightning_trainer.strategy.root_device
    on_gpu = device.type == "cuda"
    need = run_need(cfg, vocab_size, lightning_trainer.world_size, lightning_trainer.num_devices, on_gpu)
    gpu_free = torch.cuda.mem_get_info(device)[0] if on_gpu else None
    lean = None
    if on_gpu and cfg.deepspeed is not None and cfg.deepspeed[1] and lightning_trainer.world_size == 1:
        lean = run_need(dataclasses.replace(cfg, strategy="offload", precision="bf16"), vocab_size, 1, 1, True)
    check_fits(cfg, need, gpu_free, available_host_memory(), lean)


def run_need(cfg: TrainConfig, vocab_size: int, world_size: int, processes_per_host: int, on_gpu: bool,
             counts: Optional["ParameterCounts"] = None) -> Footprint:
    """The estimate of this whole run: the state of its parameters, counted on a model built on the meta device (no
    memory, no time), the family's estimate of the activations of a micro-batch at the full ctx_len (a --state_cp
    segment), head_loss's working memory, DeepSpeed's buffers and the processes themselves. `counts`: those of
    count_parameters(cfg, vocab_size), where already known."""
    from src import loss

    counts = counts or count_parameters(cfg, vocab_size)
    family = cfg.family
    shape = family.shape_from_flags(cfg, vocab_size)
    state = footprint(cfg, counts.params, counts.trainable, world_size, processes_per_host, on_gpu)
    tokens = cfg.segment_len or cfg.ctx_len
    dtype_bytes = _element_bytes(cfg)
    activations = (family.activation_bytes(shape, cfg.micro_bsz, tokens, dtype_bytes,
                                           checkpointed=bool(cfg.grad_cp or cfg.state_cp),
                                           inputs_on_device=not cfg.state_cp,
                                           wkv_kernel=on_gpu and cfg.wkv_backend != "torch")
                   + loss.head_loss_bytes(cfg.micro_bsz * tokens, vocab_size, shape.n_embd, dtype_bytes,
                                          head_trains=counts.head_trains))
    return run_footprint(cfg, state, counts.trained, activations, on_gpu, processes_per_host, world_size)


@dataclass(frozen=True)
class ParameterCounts:
    params: int  # all parameters
    trained: tuple  # the number of elements of each trained parameter
    head_trains: bool

    @property
    def trainable(self) -> int:
        return sum(self.trained)


def count_parameters(cfg: TrainConfig, vocab_size: int) -> ParameterCounts:
    """The run's parameters, counted on its model (with --lora its adapters) built on the meta device."""
    import torch

    from src.lora import adapters
    from src.models import HEAD

    family = cfg.family
    with torch.device("meta"):
        model = family.build(family.shape_from_flags(cfg, vocab_size))
        names = {name for name, _ in model.named_parameters()}
        if cfg.lora_settings:
            adapters.apply_lora(model, cfg.lora_settings)
            names = set(adapters.trainable_names(model, cfg.lora_settings))
    return ParameterCounts(params=sum(p.numel() for p in model.parameters()),
                           trained=tuple(p.numel() for n, p in model.named_parameters() if n in names),
                           head_trains=any(family.piece_of(n) == HEAD for n in names))


def _load_model_read(cfg: TrainConfig, read: bool) -> str:
    """What --estimate_memory read of --load_model, in words: a file not there yet leaves the family to the flags."""
    if read:
        return f"the keys and shapes of --load_model {cfg.load_model} were read"
    if not cfg.load_model:
        return "no --load_model was read"
    others = ", ".join(f"{f'--my_testing {f.my_testing}' if f.my_testing else 'no --my_testing'} for {f.title}"
                       for f in models.FAMILIES.values() if f is not cfg.family)
    return (f"--load_model {cfg.load_model} is not there, so the flags decide the family: {cfg.family.title}"
            + (f" ({others})" if others else ""))


def estimate_processes(cfg: TrainConfig) -> tuple:
    """(world_size, processes_per_host, on_gpu, what was assumed, in words) for --estimate_memory, which sees no
    hardware: one process per device of --devices (one when auto) on each of --num_nodes machines, on GPUs unless
    --accelerator cpu."""
    per_host = int(cfg.devices) if cfg.devices.isdigit() else 1
    on_gpu = cfg.accelerator != "cpu"
    assumed = [f"{per_host} {'GPU' if on_gpu else 'CPU'} process{'es' if per_host > 1 else ''} per machine"
               + (" (--devices auto: 1)" if not cfg.devices.isdigit() else ""),
               f"{cfg.num_nodes} machine{'s' if cfg.num_nodes > 1 else ''}"]
    if cfg.accelerator == "auto":
        assumed.append("a GPU (--accelerator auto)")
    return per_host * cfg.num_nodes, per_host, on_gpu, ", ".join(assumed)


def estimate(cfg: TrainConfig, read_load_model: bool = False) -> list:
    """--estimate_memory: the lines that tell what this command's run needs, the JSON line
    {"strategy", "gpu_gib", "host_gib", "params"} last (GiB rounded to 0.01). Builds the model on the meta device
    only: allocates nothing, reads and writes no file. `read_load_model`: train.py read --load_model's keys and
    shapes for the flags (the lines say so)."""
    import json

    vocab_size = cfg.vocab_size
    counts = count_parameters(cfg, vocab_size)
    world_size, per_host, on_gpu, assumed = estimate_processes(cfg)
    need = run_need(cfg, vocab_size, world_size, per_host, on_gpu, counts)
    short = f"{counts.params:.2e}".replace("e+0", "e").replace("e+", "e")
    trained = (f"{counts.trainable:,} of them trainable with --lora ({100 * counts.trainable / counts.params:.2f}%)"
               if cfg.lora else "all trainable")
    lines = [
        f"train.py --estimate_memory: --strategy {cfg.strategy} --precision {cfg.precision}, {cfg.family.title} "
        f"L{cfg.n_layer} D{cfg.n_embd} vocab {vocab_size}, ctx_len {cfg.ctx_len}, micro_bsz {cfg.micro_bsz}",
        f"assumed: {assumed}",
        f"GPU: {need.gpu / GIB:.1f} GiB per GPU ({need.gpu_parts})" if on_gpu else "GPU: none (--accelerator cpu)",
        f"host: {need.host / GIB:.1f} GiB per machine ({need.host_parts})",
        f"parameters: {counts.params:,} ({short}), {trained}",
        "nothing was allocated or written; no data file was read; " + _load_model_read(cfg, read_load_model),
        json.dumps({"strategy": cfg.strategy, "gpu_gib": round(need.gpu / GIB, 2),
                    "host_gib": round(need.host / GIB, 2), "params": counts.params}),
    ]
    return lines
