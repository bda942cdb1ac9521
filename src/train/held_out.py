"""--valid_data_file: the held-out loss during training, after every --valid_every-th mini-epoch and after the
run's last one.

The computation is evaluate.py's (src/eval/engine.py) on the training --ctx_len, segments and --micro_bsz, on
the training model as it stands (LoRA included), in the precision its training steps run in. Every GPU
evaluates its share of the windows and the sums and counts are added over all of them. So the row after the
last mini-epoch is what evaluate.py computes on rwkv-final.pth (exactly on a CPU in fp32; in bf16/fp16 up to
the rounding of the weights the file keeps).

Training is not changed by it: the model runs in eval mode (no dropout, so no random number is drawn) under
torch.no_grad, and goes back to train mode. Results go to valid.tsv (src/eval/valid_tsv.py), a console line, and
W&B (valid/loss, valid/perplexity, and valid/loss_by_position as a line plot).

It takes train.py's whole config (src/config.py): the held-out file is read with the training's data flags
(src/data/dataset.py DataFile) and masks, and evaluated on its context, segments and epochs.
"""
import dataclasses
import re
from pathlib import Path

import lightning.pytorch as pl

from src.eval import engine, valid_tsv
from src.train.callbacks import TrainingLog, interrupted, real_step
from src.config import TrainConfig
from src.data.dataset import DataFile, check_data_path
from src.errors import UserInputError
from src.loss import IGNORE_INDEX
from src.eval.windows import EvalWindows, load_windows
from src.io.outputs import RunFiles, run_epochs


def held_out_windows(cfg: TrainConfig, training_chars, vocab_size: int) -> EvalWindows:
    """The windows of --valid_data_file, read before training (a bad file refuses the run before anything is
    written): --ctx_len long, the training's masks, character-level text numbered by `training_chars`."""
    path = cfg.valid_data_file
    check_data_path("--valid_data_file", path, cfg.valid_data_type, "--valid_data_type")
    if cfg.valid_data_type == "binidx" and not all(Path(path + suffix).is_file() for suffix in (".bin", ".idx")):
        raise UserInputError(f"--valid_data_file {path}: file not found (binidx: give the prefix, without .bin/.idx)")
    if cfg.valid_data_type not in ("jsonl", "uint16") and 0 < cfg.valid_tokens <= cfg.ctx_len:  # one stream
        raise UserInputError(f"--valid_tokens {cfg.valid_tokens} holds no window of --ctx_len {cfg.ctx_len} (a window "
                             f"needs ctx_len + 1 = {cfg.ctx_len + 1} tokens); give at least {cfg.ctx_len + 1}, or 0 "
                             f"for all of --valid_data_file")
    held_out = dataclasses.replace(DataFile.from_flags(cfg), data_file=path, data_type=cfg.valid_data_type,
                                   vocab_size=vocab_size)
    try:
        windows = load_windows(held_out, cfg.valid_tokens, training_chars)
    except UserInputError as e:  # the reader speaks of the flags of the file it reads: here, the held-out ones
        raise UserInputError(_HELD_OUT_FLAGS.sub(lambda m: _HELD_OUT_NAMES[m.group(0)], str(e))) from None
    if cfg.my_script_mask is not None or cfg.select_name is not None:
        _check_some_target(windows, cfg)
    return windows


# evaluate.py's names for what the windows are read from -> train.py's names for the held-out data
_HELD_OUT_NAMES = {"--data_file": "--valid_data_file", "--data_type": "--valid_data_type",
                   "--max_tokens": "--valid_tokens"}
_HELD_OUT_FLAGS = re.compile("|".join(rf"{re.escape(name)}\b" for name in _HELD_OUT_NAMES))


def _check_some_target(windows: EvalWindows, cfg: TrainConfig) -> None:
    """Refuse held-out data whose every target the training's masks mask: its loss would be 0 of 0 targets."""
    for k in range(len(windows)):
        if (windows[k][1] != IGNORE_INDEX).any():
            return
    mask = (f"--my_script_mask {cfg.my_script_mask}" if cfg.my_script_mask is not None
            else f"--select_name {cfg.select_name}")
    raise UserInputError(f"--valid_data_file {cfg.valid_data_file}: {mask} masks every target of its {len(windows)} "
                         f"windows of --ctx_len {cfg.ctx_len}, so the held-out loss would be of no token; hold out "
                         f"data the mask trains on")


def appended_logs(cfg: TrainConfig) -> tuple:
    """(name, header columns) of the log in --proj_dir that held-out evaluation appends to (valid.tsv), for
    src/io/outputs.py check_appended_logs to check before training."""
    return ((valid_tsv.VALID_LOG_NAME, valid_tsv.VALID_LOG_COLUMNS),) if cfg.valid_data_file else ()


def evaluates_after(epoch: int, cfg: TrainConfig) -> bool:
    """Whether the run evaluates after its mini-epoch `epoch` (counted from 0 in this run): after every
    --valid_every-th mini-epoch of the whole training (rwkv-<N>.pth numbering, so a continued run keeps the
    rhythm) and after the last one this run trains."""
    real_epoch = cfg.epoch_begin + epoch
    return (real_epoch + 1) % cfg.valid_every == 0 or epoch == run_epochs(RunFiles.from_flags(cfg)) - 1


class Validation(pl.Callback):
    """Evaluates the model on `windows` at the end of the mini-epochs evaluates_after picks. Placed after
    TrainingLog, so its line follows the mini-epoch's and its W&B values follow the step's."""

    def __init__(self, cfg: TrainConfig, windows: EvalWindows, log: TrainingLog):
        self.cfg = cfg
        self.windows = windows
        self.training_log = log  # the run's W&B run (log.wandb, on rank 0) , for the W&B values

    def on_train_epoch_end(self, trainer, pl_module):
        if interrupted(trainer) or not evaluates_after(trainer.current_epoch, self.cfg):
            return
        with trainer.precision_plugin.forward_context():  # autocast as in the training step
            result = engine.evaluate(
                pl_module.model, self.windows, self.cfg.ctx_len, self.cfg.micro_bsz, self.cfg.segment_len,
                device=pl_module.device, rank=trainer.global_rank, world_size=trainer.world_size,
                reduce=lambda totals: trainer.strategy.reduce(totals, reduce_op="sum"))
        if trainer.is_global_zero:
            self.report(trainer, result)

    def report(self, trainer, result: engine.EvalResult) -> None:
        epoch = self.cfg.epoch_begin + trainer.current_epoch
        valid_tsv.append_row(self.cfg.proj_dir, epoch, trainer.global_step, result.summary())
        line = (f"mini-epoch {epoch}: valid loss {result.loss:.4f}, perplexity {result.perplexity:.3f}, "
                f"{result.tokens:,} tokens, {result.tokens_per_s / 1000:.2f} kt/s, {result.seconds:.1f} s")
        bar = trainer.progress_bar_callback
        if bar is not None:
            bar.print(line)  # above the bar, which redraws below it
        else:
            print(line, flush=True)
        if self.training_log.wandb is not None:
            self.log_to_wandb(trainer, result)

    def log_to_wandb(self, trainer, result: engine.EvalResult) -> None:
        import wandb

        curve = [[start, loss] for start, _, loss in result.loss_by_position if loss is not None]
        table = wandb.Table(data=curve, columns=["position", "loss"])
        self.training_log.wandb.log({"valid/loss": result.loss, "valid/perplexity": result.perplexity,
                            "valid/loss_by_position": wandb.plot.line(table, "position", "loss",
                                                                      title="valid loss by position in the window")},
                           step=real_step(trainer.global_step, self.cfg) + self.cfg.log_add_step)
