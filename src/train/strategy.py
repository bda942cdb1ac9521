"""How a run uses its hardware: --precision and --strategy as Lightning objects, the device, and the weights
gathered from wherever the strategy keeps them (all of them on one rank under ZeRO-3).

Its functions take train.py's whole config (src/config.py): they read the hardware flags together (--accelerator,
--devices, --num_nodes, --strategy, --precision, --compile, --wkv_backend and what config.py derives from them), and
their callers (train.py, evaluate.py, the trainer) hold it.
"""
import importlib.util

import lightning.pytorch as pl
import torch

from src.config import TrainConfig
from src.errors import UserInputError
from src.train.memory_check import deepspeed_bucket_elements

# --precision of the original -> Lightning precision. fp16 is mixed (fp32 weights, autocast, loss scaling); bf16
# runs bf16 weights with fp32 masters: DeepSpeed's own ("bf16-mixed" tells DeepSpeed), or src/optim/master_weights.py
# under every other strategy ("bf16-true" makes the module bf16).
LIGHTNING_PRECISION = {"fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
# dtype of the .pth files we write, as the original (bf16 runs write bf16 weights).
SAVE_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lightning_precision(cfg: TrainConfig) -> str:
    return "bf16-true" if cfg.master_weights else LIGHTNING_PRECISION[cfg.precision]


def parameter_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the model's parameters train in: 16-bit where DeepSpeed or the master-weight optimizer keep the
    fp32 copy, fp32 otherwise (fp32, tf32, and fp16 under autocast)."""
    sixteen_bit = cfg.precision in ("bf16", "fp16") and (cfg.deepspeed is not None or cfg.master_weights)
    return SAVE_DTYPE[cfg.precision] if sixteen_bit else torch.float32


def training_device(cfg: TrainConfig) -> str:
    """Where one process trains: its GPU when there is one (and --accelerator allows it), else the CPU."""
    return "cuda:0" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu"


def check_device_flags(cfg: TrainConfig) -> None:
    """Refuse flags that need a GPU when there is none to train on: Lightning would train something else than the
    banner says (fp16 becomes bf16 on a CPU) or fail deep inside the first step (the CUDA kernel)."""
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--accelerator {cfg.accelerator}: torch sees no CUDA GPU here; use --accelerator cpu "
                             f"(or auto)")
    several = (cfg.devices.isdigit() and int(cfg.devices) > 1) or cfg.num_nodes > 1
    if cfg.strategy == "single_device" and several:  # Lightning would train on one of them without a word
        raise UserInputError(f"--strategy single_device trains on one device, and --devices {cfg.devices} "
                             f"--num_nodes {cfg.num_nodes} asks for more; use --strategy auto (or ddp) for several, "
                             f"or --devices 1")
    if cfg.offload:
        check_offload_devices(cfg)
    if training_device(cfg) != "cpu":
        check_fused_kernels(cfg)
        return
    if cfg.precision == "fp16":
        raise UserInputError("--precision fp16 needs a CUDA GPU, and this run trains on the CPU (where Lightning "
                             "would train bf16 instead); use --precision bf16 or fp32")
    if cfg.wkv_backend == "cuda":
        raise UserInputError("--wkv_backend cuda runs the WKV kernel on a CUDA GPU, and this run trains on the CPU; "
                             "use --wkv_backend torch (or auto)")


def check_offload_devices(cfg: TrainConfig) -> None:
    """--strategy offload trains on exactly one GPU."""
    if training_device(cfg) == "cpu":
        # a resumed run shares its bundle's --strategy (src/train/resuming.py), so only a GPU continues it
        fix = (f"resume {cfg.resume} on a machine with a CUDA GPU: its run trained with --strategy offload, which "
               f"only --strategy offload continues" if cfg.resume else "use --strategy auto")
        raise UserInputError(f"--strategy offload keeps Adam's state in host memory for the weights on one GPU, and "
                             f"this run has no CUDA GPU to train on; {fix}")
    gpus = int(cfg.devices) if cfg.devices.isdigit() else torch.cuda.device_count()
    if gpus * cfg.num_nodes > 1:
        raise UserInputError(f"--strategy offload trains on one GPU, and this run has {gpus * cfg.num_nodes}; use "
                             f"--strategy deepspeed_stage_2_offload for several GPUs, or --devices 1")


def check_fused_kernels(cfg: TrainConfig) -> None:
    """--compile 1 on a GPU: torch.compile writes the fused kernels in Triton, which a CUDA build of torch brings
    along but another install may lack; say so before anything runs, not in the first step."""
    if cfg.compile and training_device(cfg) != "cpu" and importlib.util.find_spec("triton") is None:
        raise UserInputError("--compile 1 fuses the elementwise work into kernels that torch.compile writes in "
                             "Triton, which is not installed here; pip install triton, or pass --compile 0")


def set_float_precision(cfg: TrainConfig) -> None:
    """fp32 means true fp32 matmuls; every other mode allows TF32 (as the original)."""
    allow_tf32 = cfg.precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = True


def build_strategy(cfg: TrainConfig):
    """The strategy object (or Lightning name) for --strategy."""
    if cfg.strategy in ("single_device", "offload"):
        from lightning.pytorch.strategies import SingleDeviceStrategy
        return SingleDeviceStrategy(device=torch.device(training_device(cfg)))
    if cfg.deepspeed:
        return build_deepspeed_strategy(cfg)
    return cfg.strategy


def build_deepspeed_strategy(cfg: TrainConfig):
    """Lightning's DeepSpeedStrategy built explicitly: stage and offload from the flags; its buckets are set by
    size_buckets once the trained parameters are known.

    With bf16 its per-parameter overflow check (two reductions and a host decision per parameter, every step) is off:
    bf16 has fp32's range, there is no loss scale to adjust, and a diverged loss is caught by the step log (NaN check).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy
    stage, offload = cfg.deepspeed
    strategy = DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=offload,
        offload_parameters=offload and stage == 3,
    )
    if cfg.precision == "bf16":
        strategy.config["bf16"] = {"enabled": True, "check_grad_overflow": False}
    return strategy


def size_buckets(strategy, cfg: TrainConfig, trainable: int, world_size: int) -> None:
    """DeepSpeed's allgather and reduce buckets, in elements: --ds_bucket_mb MB of gradients in the run's dtype, under
    --lora sized by the `trainable` count, one bucket on one GPU (memory_check.deepspeed_bucket_elements, which the
    memory check counts). Called by the module's setup hook, after --lora has chosen what trains and before the
    strategy builds DeepSpeed's engine from its config."""
    zero = strategy.config["zero_optimization"]
    zero["allgather_bucket_size"] = zero["reduce_bucket_size"] = deepspeed_bucket_elements(cfg, trainable, world_size)


def is_deepspeed(strategy) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy  # importable without deepspeed installed
    return isinstance(strategy, DeepSpeedStrategy)


def full_state_dict(trainer: pl.Trainer, pl_module: pl.LightningModule, names=None) -> dict:
    """The model's state dict (only the keys in `names`, when given) on the CPU, on rank 0 ({} elsewhere).
    Collective: every rank must call it.

    Under ZeRO-3 every rank holds a slice of each parameter; they are gathered one at a time, so the
    GPU never holds more than one full parameter extra.
    """
    model = pl_module.model
    wanted = None if names is None else set(names)
    if not (is_deepspeed(trainer.strategy) and trainer.strategy.zero_stage_3):
        if not trainer.is_global_zero:
            return {}
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if wanted is None or k in wanted}
    import deepspeed
    weights = {}
    for name, param in model.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if trainer.is_global_zero:
                weights[name] = param.detach().cpu().clone()
    return weights
