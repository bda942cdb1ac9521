"""Ctrl+C and SIGTERM: finish the optimizer step, save rwkv-last.pth and a resume bundle, exit 130 / 143. A run its
data stops (StopsTraining) saves rwkv-last.pth too, then exits 2 with one line. A run that --max_steps ends before
its schedule does (--epoch_count mini-epochs) saves as a Ctrl+C stop does and exits 0, so that it continues with
--resume and a larger --max_steps; ended at a mini-epoch's last step, where a bundle cannot be taken, it saves
rwkv-last.pth.

Before training starts (loading, checks, set-up) a signal ends the run at once: nothing has been written into
--proj_dir yet, so there is nothing to save. From the start of training the first signal only sets a flag. At an
optimizer-step boundary every rank agrees to stop (any rank that got a signal stops them all: StopAgreement, at the
next boundary with one process, at the one after it with several, so that no step waits for the agreement), rank 0
writes rwkv-last.pth, all ranks write the resume bundle (a Lightning checkpoint: weights in fp32, optimizer, step and
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
        self.ranks = 1  # set by StartOfTraining: several agree on the stop one step later (StopAgreement)
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
        steps = ("this optimizer step" if self.ranks == 1 else
                 "this optimizer step and the next (the processes agree on the stop without waiting for one another)")
        print(f"\n{signal.Signals(signum).name}: finishing {steps}, then saving rwkv-last.pth and the resume bundle. "
              f"Press Ctrl+C again to quit at once.", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def completes_optimizer_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Lightning steps the optimizer after every K-th micro-batch and after the last one of an epoch."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches


class StopAgreement:
    """Asked at every optimizer-step boundary: the largest signal number any rank received (0 for none), the same
    answer on every rank, so that they all stop at the same step.

    One process: its own signal, at once, read without touching the GPU (a flag on the device read back with .item()
    would make the host wait for the whole step's GPU work, after which the GPU idles while the host prepares the
    next step).

    Several processes: each boundary launches an all-reduce (MAX) of this rank's flag without waiting for it, and
    reads the all-reduce launched at the boundary before, which finished during the step between. The ranks agree
    one optimizer step late (a signal during step k stops them all after step k + 1; one step later still when a
    mini-epoch ends between, whose last boundary saves instead of asking), and no boundary waits for the step's GPU
    work, or for the slowest rank to arrive, as a blocking all-reduce and .item() did every step.
    """

    def __init__(self):
        # the all-reduce launched at the last boundary: (its work, or None when already waited for on the stream;
        # the reduced flag, or its copy in host memory; the CUDA event after that copy, or None on the CPU)
        self.pending = None

    def signal(self, trainer: pl.Trainer, local_signum) -> int:
        if trainer.world_size == 1:
            return local_signum or 0
        agreed = self.previous()
        if not agreed:  # after a stop nothing more is launched: every rank stops here
            self.pending = _launch_max(local_signum or 0, trainer.strategy.root_device)
        return agreed

    def previous(self) -> int:
        """What the all-reduce launched at the last boundary agreed on (0 when none is pending)."""
        if self.pending is None:
            return 0
        work, flag, copied = self.pending
        self.pending = None
        if work is not None:
            work.wait()  # gloo: done on its own thread during the step; nothing left to wait for
        if copied is not None:
            copied.synchronize()  # the previous step's end at most: this step's GPU work is queued behind it
        return int(flag.item())


def _launch_max(signum: int, device: torch.device) -> tuple:
    """An all-reduce (MAX) of `signum` over the ranks, launched without waiting: StopAgreement.pending."""
    flag = torch.full((1,), signum, dtype=torch.int32, device=device)  # filled on the device: no copy, no sync
    work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
    if device.type != "cuda":
        return work, flag, None
    # NCCL: the stream waits for the all-reduce and copies its result into pinned host memory; the host waits for
    # neither, and the event tells the next boundary when the copy is there
    work.wait()
    host = torch.empty(1, dtype=torch.int32, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return None, host, copied


class StartOfTraining(pl.Callback):
    """The first callback of the run: its on_train_start, before any other callback writes a file, switches the
    signal handling from start-up (stop at once) to training (stop at a step boundary, StopOnSignal)."""

    def __init__(self, stop: StopSignal):
        self.stop = stop

    def on_train_start(self, trainer, pl_module):
        self.stop.install()  # again: Lightning installs its own SIGTERM handler when fit starts
        self.stop.ranks = trainer.world_size
        self.stop.training = True


def reached_max_steps(trainer: pl.Trainer) -> bool:
    """--max_steps (Lightning's) is set and this optimizer step reached it: the run ends here."""
    return 0 <= trainer.max_steps <= trainer.global_step


class StopOnSignal(pl.Callback):
    """Checks for a stop request, or --max_steps, at each optimizer-step boundary; saves and stops there."""

    def __init__(self, stop: StopSignal, saver, bundle_path: Path):
        self.stop = stop
        self.saver = saver  # callbacks.WeightSaver: saver.save(trainer, pl_module, name), collective under ZeRO-3
        self.bundle_path = Path(bundle_path)
        self.agreement = StopAgreement()
        self.exit_code = 0
        self.stopped = False  # a signal or --max_steps stopped the run and a resume bundle was written

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not completes_optimizer_step(trainer, batch_idx) or batch_idx + 1 == trainer.num_training_batches:
            return  # mid-accumulation, or the epoch's end (whose saves run next): stop at the next step
        signum = self.agreement.signal(trainer, self.stop.signum)
        # every rank counts the same steps: no agreement needed on --max_steps
        if not (signum or reached_max_steps(trainer)):
            return
        self.saver.save(trainer, pl_module, LAST_NAME)
        trainer.train_dataloader.position = (batch_idx + 1) * trainer.train_dataloader.batch_size
        save_resume_bundle(trainer, self.bundle_path)
        trainer.should_stop = True
        self.stopped = True
        self.exit_code = 128 + signum if signum else 0
        if trainer.is_global_zero:
            why = "Stopped" if signum else f"Reached --max_steps {trainer.max_steps} before the end of the schedule"
            more = "" if signum else " and a larger --max_steps (or -1)"
            print(f"\n{why} after optimizer step {trainer.global_step}. Saved {self.bundle_path.parent}/{LAST_NAME} "
                  f"and {self.bundle_path}; continue with the same command plus --resume {self.bundle_path}{more}",
                  file=sys.stderr, flush=True)

    def on_train_end(self, trainer, pl_module):
        """--max_steps reached at the last step of a mini-epoch before the run's last: the mini-epoch's own saves
        follow --epoch_save, so rwkv-last.pth keeps the weights (a bundle taken at an epoch's end would not resume)."""
        if self.stopped or self.saver.finished or not reached_max_steps(trainer):
            return
        self.saver.save(trainer, pl_module, LAST_NAME)
        if trainer.is_global_zero:
            following = self.saver.files.epoch_begin + trainer.current_epoch  # the epochs done so far count it
            print(f"\nReached --max_steps {trainer.max_steps} at the end of mini-epoch {following - 1}, before the "
                  f"end of the schedule. Saved {self.bundle_path.parent}/{LAST_NAME}; continue with --load_model "
                  f"{self.bundle_path.parent}/{LAST_NAME} --epoch_begin {following}", file=sys.stderr, flush=True)

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
