"""Everything that happens around the training steps: LR schedule, logs, progress bar, saving.

The schedule and the logs take train.py's whole config (src/config.py): they read the LR, accumulation, epoch, log and
W&B flags. WeightSaver takes what it uses: the run's files (src/io/outputs.py RunFiles) and the LoRA settings.
"""
import contextlib
import datetime
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler

from src.lora import adapters
from src.accumulation import lightning_schedule, optimizer_steps_before
from src.io.checkpoint import save_weights
from src.config import TrainConfig
from src.data.dataset import context_length, write_char_vocab
from src.errors import UserInputError
from src.lora.settings import LoraSettings
from src.io.outputs import (FINAL_NAME, INIT_NAME, LOG_NAME, STEP_LOG_COLUMNS, STEP_LOG_NAME, RunFiles,
                            epoch_file_name, saves_epoch, writes_init_file)
from src.train.stopping import completes_optimizer_step
from src.train.strategy import full_state_dict, is_deepspeed

# The step log is written every _FLUSH_EVERY optimizer steps (each write waits for the GPU once), and after the
# first step that ends _FLUSH_SECONDS or more after the last write (slow steps: rows on disk while the run goes on).
_FLUSH_EVERY = 20
_FLUSH_SECONDS = 30.0


def real_step(step: int, cfg: TrainConfig) -> int:
    """Optimizer steps counted from the start of the whole training (this run's step + earlier runs')."""
    previous = cfg.previous_step if cfg.previous_step is not None else optimizer_steps_before(cfg, cfg.epoch_begin)
    return step + previous


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR at optimizer step `step` of this run (the original's schedule, in consistent units).

    All quantities count optimizer steps: the original mixed optimizer steps with micro-batches, so with
    --accumulate_grad_batches K its decay ran K times too slowly. Under an
    accumulation schedule, mini-epochs have different numbers of optimizer steps (src/accumulation.py).
    - The decay spans epoch_count mini-epochs (minus my_pile_edecay): exponential from lr_init to lr_final,
      linear when lr_final is 0; flat when lr_final == lr_init.
    - Warm-up over the first warmup_steps steps of this run multiplies by 0.2 + 0.8 * step / warmup_steps.
    """
    if cfg.lr_final == cfg.lr_init:
        lr = cfg.lr_init
    else:
        decay_start = optimizer_steps_before(cfg, cfg.my_pile_edecay)
        decay_step = real_step(step, cfg) - decay_start
        decay_total = optimizer_steps_before(cfg, cfg.epoch_count) - decay_start
        span = decay_total - cfg.warmup_steps
        progress = 1.0 if span <= 0 else min(max((decay_step - cfg.warmup_steps + 1) / span, 0.0), 1.0)
        if cfg.lr_final == 0:
            lr = cfg.lr_init + (cfg.lr_final - cfg.lr_init) * progress
        else:
            lr = cfg.lr_init * math.exp(math.log(cfg.lr_final / cfg.lr_init) * progress)
    if step < cfg.warmup_steps:
        lr *= 0.2 + 0.8 * step / cfg.warmup_steps
    return lr


def interrupted(trainer: pl.Trainer) -> bool:
    """True in on_train_epoch_end when a Ctrl+C / SIGTERM stop cut the epoch short (only StopOnSignal sets
    should_stop): its line and checkpoint belong to the resumed run."""
    return trainer.should_stop


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


class AccumulationSchedule(GradientAccumulationScheduler):
    """Lightning's accumulation schedule for --accumulate_grad_batches_dict, keyed by the mini-epochs of
    src/accumulation.py, and also right in an epoch that a resumed run re-enters half-way: Lightning calls no
    on_train_epoch_start there, so its scheduler would leave the Trainer's initial 1 in place."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(lightning_schedule(cfg))

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.on_train_epoch_start(trainer, pl_module)


class TrainingLog(pl.Callback):
    """What a run reports, on rank 0:

    - train_log.txt as the original: a NEW RUN header (flags, and the DeepSpeed config), then per mini-epoch
      `epoch mean_loss exp(mean_loss) lr time epoch_in_this_run` (the loss averaged over all GPUs);
    - train_steps.tsv: one row per optimizer step (rank 0's loss), for loss curves without W&B;
    - W&B (--wandb PROJECT) per optimizer step: loss, lr, Gtokens, kt/s, at step real_step + log_add_step;
    - the progress bar: loss (mean of this mini-epoch so far), lr, kt/s (all GPUs, this mini-epoch so far), ctx_len;
    - without a progress bar (--enable_progress_bar 0, or output that is not a terminal): one plain line per
      mini-epoch on stdout, with the mini-epoch's own kt/s.
    The running sums travel in the resume bundle, so a resumed run continues its mini-epoch's mean.
    """

    def __init__(self, cfg: TrainConfig, schedule: LearningRateSchedule, print_epochs: bool):
        self.cfg = cfg
        self.schedule = schedule
        self.print_epochs = print_epochs
        self.proj_dir = Path(cfg.proj_dir)
        self.last_mean_loss = None  # of the last mini-epoch this run finished
        self.epoch_loss = None  # tensor on the model's device: sum of micro-batch losses this mini-epoch
        self.epoch_batches = 0
        self.tokens = 0  # tokens trained on so far, all GPUs, earlier runs included
        self.tokens_at_start = 0  # `tokens` when this run started training (a resumed run's earlier ones)
        self.tokens_at_epoch_start = 0  # `tokens` when this run started the current mini-epoch
        self.started = self.epoch_started = time.perf_counter()  # reset when training starts
        self.after_first_step = None  # (time, tokens) when this run's first optimizer step ended
        self.step_loss = None
        self.step_batches = 0
        self.pending_rows = []
        self.last_flush = self.started
        self.wandb = None

    # ---- run start and end
    def on_train_start(self, trainer, pl_module):
        self.started = self.epoch_started = self.last_flush = time.perf_counter()
        self.tokens_at_start = self.tokens_at_epoch_start = self.tokens
        if self.epoch_loss is None:
            self.epoch_loss = torch.zeros((), device=pl_module.device)
        else:  # restored from a resume bundle
            self.epoch_loss = self.epoch_loss.to(pl_module.device)
        if not trainer.is_global_zero:
            return
        with open(self.proj_dir / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(f"NEW RUN {self.cfg.timestamp}\n{asdict(self.cfg)}\n")
            if is_deepspeed(trainer.strategy):
                f.write(f"{trainer.strategy.config}\n")
        steps = self.proj_dir / STEP_LOG_NAME
        if not steps.exists():
            steps.write_text("\t".join(STEP_LOG_COLUMNS) + "\n", encoding="utf-8")
        if self.cfg.wandb:
            import wandb  # only W&B users need it installed and configured (WANDB_MODE is respected)
            self.wandb = wandb.init(project=self.cfg.wandb, name=f"{self.cfg.run_name} {self.cfg.timestamp}",
                                    config=asdict(self.cfg), dir=str(self.proj_dir), save_code=False)

    def on_train_end(self, trainer, pl_module):
        self.flush_rows(trainer)
        if self.wandb is not None:
            self.wandb.finish()

    def on_exception(self, trainer, pl_module, exception):
        with contextlib.suppress(OSError):  # the exception may be a full disk: losing rows must not hide it
            self.flush_rows(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.flush_rows(trainer)  # rows up to the saved step are on disk before the bundle is

    # ---- per micro-batch and per optimizer step
    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_loss = torch.zeros((), device=pl_module.device)
        self.epoch_batches = 0
        self.epoch_started = time.perf_counter()
        self.tokens_at_epoch_start = self.tokens

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["token_loss"].float()
        self.epoch_loss = self.epoch_loss + loss
        self.epoch_batches += 1
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss
        self.step_batches += 1
        self.tokens += outputs["tokens"] * trainer.world_size
        speed = self.speed()
        ctx_len = context_length(trainer.global_step, self.cfg)
        pl_module.log_dict({"loss": self.epoch_loss / self.epoch_batches, "lr": self.schedule.lr, "kt/s": speed,
                            "ctx_len": float(ctx_len)}, prog_bar=True, on_step=True, on_epoch=False)
        if completes_optimizer_step(trainer, batch_idx):
            self.pending_rows.append((trainer.global_step, trainer.current_epoch, self.step_loss / self.step_batches,
                                      self.schedule.lr, ctx_len, self.tokens / 1e9, speed))
            self.step_loss, self.step_batches = None, 0
            if self.after_first_step is None:
                self.after_first_step = (time.perf_counter(), self.tokens)
            if (len(self.pending_rows) >= _FLUSH_EVERY
                    or time.perf_counter() - self.last_flush >= _FLUSH_SECONDS):
                self.flush_rows(trainer)

    def speed(self) -> float:
        """Thousands of tokens per second in the current mini-epoch so far, all GPUs (its own rate: earlier
        mini-epochs, start-up and saving between mini-epochs left out)."""
        seconds = time.perf_counter() - self.epoch_started
        return (self.tokens - self.tokens_at_epoch_start) / max(seconds, 1e-9) / 1000

    def steady_speed(self):
        """Tokens per second after this run's first optimizer step (start-up and warm-up left out; None before a
        second step): what a benchmark's steady state measures."""
        if self.after_first_step is None or self.tokens == self.after_first_step[1]:
            return None
        started, tokens = self.after_first_step
        return (self.tokens - tokens) / max(time.perf_counter() - started, 1e-9)

    @property
    def tokens_trained(self) -> int:
        """Tokens this run trained on (all GPUs; a resumed run's earlier tokens not included)."""
        return self.tokens - self.tokens_at_start

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def flush_rows(self, trainer) -> None:
        """Write pending step rows (one device-to-host copy for all of them) to the step log and W&B."""
        rows, self.pending_rows = self.pending_rows, []
        self.last_flush = time.perf_counter()
        if not rows or not trainer.is_global_zero:
            return
        losses = torch.stack([row[2] for row in rows]).tolist()
        with open(self.proj_dir / STEP_LOG_NAME, "a", encoding="utf-8") as f:
            for (step, epoch, _, lr, ctx_len, gtokens, speed), loss in zip(rows, losses):
                f.write(f"{step}\t{self.cfg.epoch_begin + epoch}\t{loss:.6f}\t{lr:.8g}\t{ctx_len}\t{gtokens:.9f}\t"
                        f"{speed:.3f}\n")
                if self.wandb is not None:
                    self.wandb.log({"loss": loss, "lr": lr, "Gtokens": gtokens, "kt/s": speed},
                                   step=real_step(step, self.cfg) + self.cfg.log_add_step)

    # ---- per mini-epoch
    def on_train_epoch_end(self, trainer, pl_module):
        if interrupted(trainer):
            return
        totals = torch.stack([self.epoch_loss, torch.tensor(float(self.epoch_batches), device=self.epoch_loss.device)])
        totals = trainer.strategy.reduce(totals, reduce_op="sum")  # every rank's micro-batches
        mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
        self.last_mean_loss = mean_loss
        self.flush_rows(trainer)
        epoch = trainer.current_epoch
        if not math.isfinite(mean_loss):  # every rank sees the reduced mean, so every rank stops here
            raise UserInputError(
                f"the training loss became {mean_loss} in mini-epoch {self.cfg.epoch_begin + epoch} (train_steps.tsv "
                f"has each step's): the run diverged, so this mini-epoch's weights were not saved; the files saved "
                f"before it are whole. Lower --lr_init ({self.cfg.lr_init:g}), or look for broken samples in the data.")
        if trainer.is_global_zero:
            with open(self.proj_dir / LOG_NAME, "a", encoding="utf-8") as f:
                f.write(f"{self.cfg.epoch_begin + epoch} {mean_loss:.6f} {math.exp(min(mean_loss, 700)):.4f} "
                        f"{self.schedule.lr:.8f} {datetime.datetime.now()} {epoch}\n")
            if self.print_epochs:
                print(f"mini-epoch {self.cfg.epoch_begin + epoch}: loss {mean_loss:.4f}, lr {self.schedule.lr:.3g}, "
                      f"{self.speed():.2f} kt/s, ctx_len {context_length(trainer.global_step, self.cfg)}, "
                      f"{time.perf_counter() - self.epoch_started:.1f} s", flush=True)

    # ---- resume bundle
    def state_dict(self) -> dict:
        return {"epoch_loss": self.epoch_loss.item() if self.epoch_loss is not None else 0.0,
                "epoch_batches": self.epoch_batches, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_loss = torch.tensor(state["epoch_loss"])
        self.epoch_batches = state["epoch_batches"]
        self.tokens = self.tokens_at_start = state["tokens"]


class WeightSaver(pl.Callback):
    """Writes, when training starts, vocab.json of character-level data and rwkv-init.pth of a fresh model (not
    before: a run that stops or fails during start-up leaves --proj_dir as it was); rwkv-<epoch>.pth every
    --epoch_save mini-epochs and for the last one, and rwkv-final.pth when --epoch_count is reached; `save` also
    writes rwkv-last.pth for a stopped run. `saved` lists the .pth names written, for the run's summary."""

    def __init__(self, files: RunFiles, lora: Optional[LoraSettings], dtype: torch.dtype, write: bool = True):
        self.files = files
        self.lora = lora  # a LoRA run saves only what LoRA trains
        self.dtype = dtype  # of the .pth files (the run's precision)
        self.write = write  # False: a benchmark's run, which saves no weights
        self.char_vocab = None  # character-level data: the character of each token id, for vocab.json
        self.finished = False
        self.saved = []

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero and self.char_vocab is not None:
            write_char_vocab(self.char_vocab, self.files.proj_dir)
        if writes_init_file(self.files):
            self.save(trainer, pl_module, INIT_NAME)

    def save(self, trainer, pl_module, name: str) -> None:
        """The whole model, or in a LoRA run only what LoRA trains (+ its settings), as --proj_dir/name.

        Every rank calls it (under ZeRO-3 the weights are gathered from all of them); rank 0 writes.
        """
        if not self.write:
            return
        model, settings = pl_module.model, self.lora
        names = adapters.trainable_names(model, settings) if settings else None
        weights = full_state_dict(trainer, pl_module, names)
        if trainer.is_global_zero:
            if settings:
                weights = adapters.lora_state_dict(model, settings, weights)
            save_weights(weights, Path(self.files.proj_dir) / name, self.dtype)
            self.saved.append(name)

    def on_train_epoch_end(self, trainer, pl_module):
        if interrupted(trainer):
            return
        epoch = trainer.current_epoch
        real_epoch = self.files.epoch_begin + epoch
        self.finished = real_epoch == self.files.epoch_count - 1
        if saves_epoch(epoch, self.files):
            self.save(trainer, pl_module, epoch_file_name(real_epoch))

    def on_train_end(self, trainer, pl_module):
        if self.finished:
            self.save(trainer, pl_module, FINAL_NAME)
