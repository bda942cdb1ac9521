"""Lightning glue: the training step (src/loss.py through src/train/state_cp/engine.py), the optimizer and its parameter
groups, and the Trainer itself. The model (src/models/rwkv4/model.py) knows nothing of this module.

It takes train.py's whole config (src/config.py): the step, Adam and the Trainer read most of the optimizer, schedule,
precision and hardware flags.
"""
import lightning.pytorch as pl
import torch

from src.train.state_cp import engine
from src.config import TrainConfig
from src.models import family_of_model
from src.optim.host_offload import HostOffloadAdam
from src.optim.master_weights import MasterWeightAdam
from src.train.memory_check import OPTIMIZER_GROUP_NUMEL
from src.train.strategy import build_strategy, is_deepspeed, lightning_precision, size_buckets


def build_param_groups(model: torch.nn.Module, cfg: TrainConfig, max_group_numel: int = 0) -> list:
    """Adam parameter groups with an `lr_scale` each (the original's layer-wise LR), in model order.

    layerwise_lr 1: each parameter's multiplier from the model's family (its lr_multiplier).
    weight_decay > 0: weight matrices (two dimensions once squeezed: embeddings, projections, head) go to
    groups with decoupled weight decay; vectors, time_mix [1, 1, C] and norms never decay.
    max_group_numel > 0: groups are cut into consecutive groups of at most that many elements (a parameter
    larger than that gets a group of its own). Frozen parameters are left out; empty groups are dropped.
    """
    pile_stage_2 = cfg.my_pile_stage == 2
    family = family_of_model(model)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = family.lr_multiplier(name, pile_stage_2) if cfg.layerwise_lr else 1.0
        decay = cfg.weight_decay if (cfg.weight_decay > 0 and family.weight_decayed(name, p.shape)) else 0.0
        pieces = groups.setdefault((scale, decay), [])
        if not pieces or (max_group_numel and pieces[-1]["numel"] + p.numel() > max_group_numel
                          and pieces[-1]["params"]):
            pieces.append({"params": [], "names": [], "numel": 0, "lr_scale": scale, "weight_decay": decay})
        pieces[-1]["params"].append(p)
        pieces[-1]["names"].append(name)
        pieces[-1]["numel"] += p.numel()
    return [{k: v for k, v in group.items() if k != "numel"} for key in sorted(groups) for group in groups[key]]


class RWKVModule(pl.LightningModule):
    """Wraps an RWKV nn.Module for Lightning: one training step per micro-batch."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.keep_bytes = None  # --state_cp: host memory for block inputs kept between its passes (bytes)

    def setup(self, stage):
        """Before the strategy sets up: DeepSpeed's buckets sized for what this run trains (--lora: few parameters)."""
        if is_deepspeed(self.trainer.strategy):
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            size_buckets(self.trainer.strategy, self.cfg, trainable, self.trainer.world_size)

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) token ids, (B, T) targets
        if self.keep_bytes is None:  # measured once, after the strategy's set-up took its host memory
            # on a CPU the host is the device: keeping block inputs there would grow memory with the sample
            self.keep_bytes = engine.host_memory_for_kept_segments(self.trainer.num_devices) if x.is_cuda else 0
        loss = engine.sample_loss(self.model, x, y, self.cfg.segment_len, self.keep_bytes)
        # Lightning divides "loss" by accumulate_grad_batches; "token_loss" is the plain value for logs.
        return {"loss": loss, "token_loss": loss.detach(), "tokens": y.numel()}

    def configure_optimizers(self):
        """Adam on fp32 master weights: DeepSpeed's FusedAdam (DeepSpeedCPUAdam when ZeRO offloads the optimizer),
        MasterWeightAdam for a bf16 model (src/optim/master_weights.py, one CUDA kernel per group), HostOffloadAdam
        under --strategy offload (src/optim/host_offload.py: the same step on the host), or torch's own on fp32
        weights (fused on CUDA in fp32/tf32). weight_decay is decoupled (AdamW) and per group."""
        strategy = self.trainer.strategy
        bounded = is_deepspeed(strategy) or self.cfg.master_weights
        groups = build_param_groups(self.model, self.cfg, OPTIMIZER_GROUP_NUMEL if bounded else 0)
        for group in groups:
            group.pop("names")
        adamw = self.cfg.weight_decay > 0
        settings = dict(lr=self.cfg.lr_init, betas=self.cfg.betas, eps=self.cfg.adam_eps)
        if is_deepspeed(strategy):
            from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
            if "offload_optimizer" in strategy.config["zero_optimization"]:
                return DeepSpeedCPUAdam(groups, **settings, bias_correction=True, adamw_mode=adamw, amsgrad=False)
            return FusedAdam(groups, **settings, bias_correction=True, adam_w_mode=adamw, amsgrad=False)
        if self.cfg.offload:
            return HostOffloadAdam(groups, **settings, adamw=adamw, max_grad_norm=self.cfg.gradient_clip_val)
        if self.cfg.master_weights:
            return MasterWeightAdam(groups, **settings, adamw=adamw, max_grad_norm=self.cfg.gradient_clip_val)
        # Lightning's mixed-precision plugin refuses gradient clipping with fused Adam (it assumes the fused step
        # unscales fp16 gradients itself), so fused Adam only runs in fp32/tf32
        fused = self.cfg.precision in ("fp32", "tf32") and all(p.is_cuda for g in groups for p in g["params"])
        optimizer_class = torch.optim.AdamW if adamw else torch.optim.Adam
        return optimizer_class(groups, **settings, fused=fused or None)


def build_trainer(cfg: TrainConfig, callbacks: list, max_epochs: int, progress_bar: bool) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if cfg.accelerator == "cuda" else cfg.accelerator,
        devices=int(cfg.devices) if cfg.devices.isdigit() else cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg),
        precision=lightning_precision(cfg),
        max_epochs=max_epochs,
        max_steps=cfg.max_steps,
        # under a schedule, callbacks.AccumulationSchedule sets it per epoch (Lightning wants 1 here then)
        accumulate_grad_batches=1 if cfg.accumulate_grad_batches_dict else cfg.accumulate_grad_batches,
        # MasterWeightAdam clips in fp32 inside its step (Lightning would clip the bf16 gradients)
        gradient_clip_val=None if cfg.master_weights else cfg.gradient_clip_val,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # every rank draws its own windows (seeded by rank)
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        detect_anomaly=cfg.debug,
    )
