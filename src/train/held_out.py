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
"""
import dataclasses
from pathlib import Path

import lightning.pytorch as pl

from src.eval import engine, valid_tsv
from src.train.callbacks import TrainingLog, interrupted, real_step
from src.config import TrainConfig
from src.errors import UserInputError
from src.eval.windows import EvalWindows, load_windows
from src.io.outputs import run_epochs


def held_out_windows(cfg: TrainConfig, training_chars, vocab_size: int) -> EvalWindows:
    """The windows of --valid_data_file, read before training (a bad file refuses the run before anything is
    written): --ctx_len long, the training's masks, character-level text numbered by `training_chars`."""
    path = cfg.valid_data_file
    present = (all(Path(path + suffix).is_file() for suffix in (".bin", ".idx")) if cfg.valid_data_type == "binidx"
               else Path(path).is_file())
    if not present:
        hint = " (binidx: give the prefix, without .bin/.idx)" if cfg.valid_data_type == "binidx" else ""
        raise UserInputError(f"--valid_data_file {path}: file not found{hint}")
    held_out = dataclasses.replace(cfg, data_file=path, data_type=cfg.valid_data_type, vocab_size=vocab_size)
    return load_windows(held_out, cfg.valid_tokens, training_chars)


def evaluates_after(epoch: int, cfg: TrainConfig) -> bool:
    """Whether the run evaluates after its mini-epoch `epoch` (counted from 0 in this run): after every
    --valid_every-th mini-epoch of the whole training (rwkv-<N>.pth numbering, so a continued run keeps the
    rhythm) and after the last one this run trains."""
    real_epoch = cfg.epoch_begin + epoch
    return (real_epoch + 1) % cfg.valid_every == 0 or epoch == run_epochs(cfg) - 1


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
