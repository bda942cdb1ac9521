"""Ctrl+C and SIGTERM: finish the optimizer step, save rwkv-last.pth and a resume bundle, exit 130 / 143. A run its
data stops (StopsTraining) saves rwkv-last.pth too, then exits 2 with one line.

Before training starts (loading, checks, set-up) a signal ends the run at once: nothing has been written into
--proj_dir yet, so there is nothing to save. From the start of training the first signal only sets a flag. At the
next optimizer-step boundary every rank agrees (any rank that got a signal stops them all), rank 0 writes
rwkv-last.pth, all ranks write the resume bundle (a Lightning checkpoint: weights in fp32, optimizer, step and
epoch counters, data position, RNG, the TrainingLog sums; a folder under DeepSpeed), and training ends. A second
Ctrl+C quits at once: writes in progress are deleted, files already written stay whole (every write is temp file +
rename), and the --proj_dir lock is released.

src/train/resuming.py reads such a bundle back (`--resume`).
"""
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from src import cli
from src.errors import StopsTraining, UserInputError
from src.io.atomic import atomic_path, disk_full_error, is_disk_full, publish
from src.io.outputs import LAST_NAME


class StopSignal:
    """Signal handler: before training starts a SIGINT/SIGTERM raises Interrupted; during training the first one
    asks the run to stop at the next optimizer step. A second one, in either phase, quits at once (cli.quit_at_once).
    """

    def __init__(self):
        self.signum = None
        self.training = False  # set by StartOfTraining
        self.previous = {}
        self.pid = os.getpid()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.signal(signum, self._handle)
            if handler is not self._handle:
                self.previous.setdefault(signum, handler)

    def restore(self) -> None:
        """Put back the handlers that were there before (train.main may run inside a larger program)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return  # a process forked from the run with this handler installed: the run's to handle
        if self.signum is not None:
            cli.quit_at_once(signum)  # temporary files deleted, the lock released
        self.signum = signum
        if not self.training:
            raise cli.Interrupted(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this optimizer step, then saving rwkv-last.pth and "
              f"the resume bundle. Press Ctrl+C again to quit at once.", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def completes_optimizer_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Lightning steps the optimizer after every K-th micro-batch and after the last one of an epoch."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches


def agreed_signal(trainer: pl.Trainer, local_signum) -> int:
    """The largest signal number any rank received (0 for none): every rank takes the same decision.

    Asked after every optimizer step. With one process the answer is its own signal, read without touching the
    GPU: a flag on the device read back with .item() would make the host wait for the whole step's GPU work,
    after which the GPU idles while the host prepares the next step."""
    if trainer.world_size == 1:
        return local_signum or 0
    flag = torch.tensor([local_signum or 0], dtype=torch.int32, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


class StartOfTraining(pl.Callback):
    """The first callback of the run: its on_train_start, before any other callback writes a file, switches the
    signal handling from start-up (stop at once) to training (stop at a step boundary, StopOnSignal)."""

    def __init__(self, stop: StopSignal):
        self.stop = stop

    def on_train_start(self, trainer, pl_module):
        self.stop.install()  # again: Lightning installs its own SIGTERM handler when fit starts
        self.stop.training = True


class StopOnSignal(pl.Callback):
    """Checks for a stop request at each optimizer-step boundary; saves and stops when there is one."""

    def __init__(self, stop: StopSignal, saver, bundle_path: Path):
        self.stop = stop
        self.saver = saver  # callbacks.WeightSaver: saver.save(trainer, pl_module, name), collective under ZeRO-3
        self.bundle_path = Path(bundle_path)
        self.exit_code = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not completes_optimizer_step(trainer, batch_idx) or batch_idx + 1 == trainer.num_training_batches:
            return  # mid-accumulation, or the epoch's end (whose saves run next): stop at the next step
        signum = agreed_signal(trainer, self.stop.signum)
        if not signum:
            return
        self.saver.save(trainer, pl_module, LAST_NAME)
        trainer.train_dataloader.position = (batch_idx + 1) * trainer.train_dataloader.batch_size
        save_resume_bundle(trainer, self.bundle_path)
        trainer.should_stop = True
        self.exit_code = 128 + signum
        if trainer.is_global_zero:
            print(f"\nStopped after optimizer step {trainer.global_step}. Saved "
                  f"{self.bundle_path.parent}/rwkv-last.pth and {self.bundle_path}; continue with the same command "
                  f"plus --resume {self.bundle_path}",
                  file=sys.stderr, flush=True)


    def on_exception(self, trainer, pl_module, exception):
        """A run that its data stops once training runs (StopsTraining: a sample its masks leave no target in) keeps
        what it trained, as a Ctrl+C stop does: rwkv-last.pth, the weights after the last optimizer step, and the one
        line says so. No resume bundle: resumed, the run would draw the same sample again. (With several processes
        the stopping one cannot have the others save: nothing is added then.)"""
        if not (isinstance(exception, StopsTraining) and self.stop.training and trainer.world_size == 1
                and self.saver.write):
            return
        last = self.bundle_path.parent / LAST_NAME
        try:
            self.saver.save(trainer, pl_module, LAST_NAME)
        except UserInputError as e:  # a full disk: the stop's own line still comes first
            exception.add(f"saving {last} failed too: {e}")
            return
        exception.add(f"{last} holds the weights trained so far ({trainer.global_step} optimizer steps)")


def save_resume_bundle(trainer: pl.Trainer, path: Path) -> None:
    """trainer.save_checkpoint into a temporary file/folder on every rank, then rank 0 renames it into place."""
    with atomic_path(path, shared=True) as tmp:  # under DeepSpeed every rank writes its part of the folder
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # everything: optimizer, loops, callback states
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(path, _bundle_bytes(trainer.lightning_module)) from e
            raise
        trainer.strategy.barrier("resume bundle written")
        if trainer.is_global_zero:
            publish(tmp, path)
    trainer.strategy.barrier("resume bundle published")


def _bundle_bytes(pl_module: pl.LightningModule) -> int:
    """About the size of a resume bundle: fp32 weights, and Adam's two fp32 moments of the trained ones."""
    return sum((4 + 8 * p.requires_grad) * p.numel() for p in pl_module.parameters())
