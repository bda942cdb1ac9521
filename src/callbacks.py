"""Everything that happens around the training steps: LR schedule, logs, progress bar, saving."""
import datetime
import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch

from src.checkpoint import save_weights
from src.config import TrainConfig
from src.dataset import optimizer_steps_per_epoch


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR at optimizer step `step` of this run (the original's schedule, in consistent units).

    All quantities count optimizer steps: the original mixed optimizer steps with micro-batches, so with
    --accumulate_grad_batches K its decay ran K times too slowly (bug 15 of the reference).
    - The decay spans epoch_count mini-epochs (minus my_pile_edecay): exponential from lr_init to lr_final,
      linear when lr_final is 0; flat when lr_final == lr_init or epoch_count == 0.
    - Warm-up over the first warmup_steps steps of this run multiplies by 0.2 + 0.8 * step / warmup_steps.
    """
    per_epoch = optimizer_steps_per_epoch(cfg)
    previous = cfg.previous_step if cfg.previous_step is not None else cfg.epoch_begin * per_epoch
    real_step = step + previous
    if cfg.lr_final == cfg.lr_init or cfg.epoch_count == 0:
        lr = cfg.lr_init
    else:
        decay_step = real_step - cfg.my_pile_edecay * per_epoch
        decay_total = (cfg.epoch_count - cfg.my_pile_edecay) * per_epoch
        span = decay_total - cfg.warmup_steps
        progress = 1.0 if span <= 0 else min(max((decay_step - cfg.warmup_steps + 1) / span, 0.0), 1.0)
        if cfg.lr_final == 0:
            lr = cfg.lr_init + (cfg.lr_final - cfg.lr_init) * progress
        else:
            lr = cfg.lr_init * math.exp(math.log(cfg.lr_final / cfg.lr_init) * progress)
    if step < cfg.warmup_steps:
        lr *= 0.2 + 0.8 * step / cfg.warmup_steps
    return lr


class LearningRateSchedule(pl.Callback):
    """Sets every parameter group's LR (times its lr_scale) before each micro-batch."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.lr = cfg.lr_init

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = learning_rate(trainer.global_step, self.cfg)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr * group.get("lr_scale", 1.0)


class TrainingLog(pl.Callback):
    """train_log.txt as the original (a NEW RUN header, one line per mini-epoch) and progress-bar figures.

    Progress bar: loss (mean of this mini-epoch so far), lr, kt/s (thousand tokens per second, all GPUs).
    """

    def __init__(self, cfg: TrainConfig, schedule: LearningRateSchedule, extra_header: str = ""):
        self.cfg = cfg
        self.schedule = schedule
        self.extra_header = extra_header
        self.path = Path(cfg.proj_dir) / "train_log.txt"

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"NEW RUN {self.cfg.timestamp}\n{asdict(self.cfg)}\n{self.extra_header}")
        self.started = time.perf_counter()
        self.tokens = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.loss_sum = torch.zeros((), device=pl_module.device)
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss_sum += outputs["token_loss"].float()
        self.batches += 1
        self.tokens += outputs["tokens"] * trainer.world_size
        elapsed = time.perf_counter() - self.started
        pl_module.log("loss", self.loss_sum / self.batches, prog_bar=True, on_step=True, on_epoch=False)
        pl_module.log("lr", self.schedule.lr, prog_bar=True, on_step=True, on_epoch=False)
        if elapsed > 0:
            pl_module.log("kt/s", self.tokens / elapsed / 1000, prog_bar=True, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module):
        totals = torch.stack([self.loss_sum, torch.tensor(float(self.batches), device=self.loss_sum.device)])
        totals = trainer.strategy.reduce(totals, reduce_op="sum")  # every rank's micro-batches
        mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
        if trainer.is_global_zero:
            epoch = trainer.current_epoch
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{self.cfg.epoch_begin + epoch} {mean_loss:.6f} {math.exp(min(mean_loss, 700)):.4f} "
                        f"{self.schedule.lr:.8f} {datetime.datetime.now()} {epoch}\n")


class WeightSaver(pl.Callback):
    """Writes rwkv-<epoch>.pth every --epoch_save mini-epochs and for the last one, and rwkv-final.pth at
    the end of --epoch_count. `weights_of(pl_module)` gives the dict to save (full model, or LoRA keys)."""

    def __init__(self, cfg: TrainConfig, dtype: torch.dtype, weights_of):
        self.cfg = cfg
        self.dtype = dtype
        self.weights_of = weights_of

    def save(self, trainer, pl_module, name: str) -> None:
        weights = self.weights_of(pl_module)
        if trainer.is_global_zero:
            save_weights(weights, Path(self.cfg.proj_dir) / name, self.dtype)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        real_epoch = self.cfg.epoch_begin + epoch
        periodic = self.cfg.epoch_save > 0 and epoch % self.cfg.epoch_save == 0
        if periodic or real_epoch == self.cfg.epoch_count - 1:
            self.save(trainer, pl_module, f"rwkv-{real_epoch}.pth")

    def on_train_end(self, trainer, pl_module):
        if self.cfg.epoch_begin + trainer.current_epoch >= self.cfg.epoch_count:
            self.save(trainer, pl_module, "rwkv-final.pth")
