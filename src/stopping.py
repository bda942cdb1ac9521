"""Ctrl+C and SIGTERM: finish the optimizer step, save rwkv-last.pth and a resume bundle, exit 130 / 143.

Before training starts (loading, checks, set-up) a signal ends the run at once: nothing has been written into
--proj_dir yet, so there is nothing to save. From the start of training the first signal only sets a flag. At the
next optimizer-step boundary every rank agrees (any rank that got a signal stops them all), rank 0 writes
rwkv-last.pth, all ranks write the resume bundle (a Lightning checkpoint: weights in fp32, optimizer, step and
epoch counters, data position, RNG, the TrainingLog sums; a folder under DeepSpeed), and training ends. A second
Ctrl+C quits at once: writes in progress are deleted, files already written stay whole (every write is temp file +
rename), and the --proj_dir lock is released.

`--resume <bundle>` continues exactly where the run stopped; the flags that shape the run must match. When the
resumed run ends normally, the bundle is removed: its state lies behind the files that run wrote.
"""
import dataclasses
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch

from src import run_lock
from src.atomic import atomic_path, disk_full_error, is_disk_full, publish, remove_partial_files, remove_path
from src.checkpoint import is_resume_bundle, read_pytorch_file, strip_wrapper_prefix, weight_mismatches
from src.cli import Interrupted
from src.config import TrainConfig
from src.errors import UserInputError
from src.outputs import BUNDLE_NAME, LAST_NAME

# Flags that may change between a run and its resumption (they do not change the training maths).
RESUME_FREE_FLAGS = {"resume", "load_model", "lora_load", "proj_dir", "wandb", "enable_progress_bar", "max_epochs",
                     "max_steps", "random_seed", "debug", "timestamp", "wkv_backend", "log_add_step",
                     "overwrite_proj_dir",
                     "lora_settings",  # derived from --lora_* flags, which are compared
                     "valid_data_file", "valid_data_type", "valid_every", "valid_tokens"}  # held-out loss: reads only


class StopSignal:
    """Signal handler: before training starts a SIGINT/SIGTERM raises Interrupted; during training the first one
    asks the run to stop at the next optimizer step, a second one exits immediately."""

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
            return  # a DataLoader worker forked with this handler, before its own ignores signals: the run's to handle
        if not self.training:
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: finishing this optimizer step, then saving rwkv-last.pth and "
                  f"the resume bundle. Press Ctrl+C again to quit at once.", file=sys.stderr, flush=True)
            return
        print("\nQuitting now; files already written are intact.", file=sys.stderr, flush=True)
        remove_partial_files()
        run_lock.release_all()
        os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def completes_optimizer_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Lightning steps the optimizer after every K-th micro-batch and after the last one of an epoch."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches


def agreed_signal(trainer: pl.Trainer, local_signum) -> int:
    """The largest signal number any rank received (0 for none): every rank takes the same decision."""
    flag = torch.tensor([local_signum or 0], dtype=torch.int32, device=trainer.strategy.root_device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
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
            print(f"\nStopped after optimizer step {trainer.global_step}. Saved {self.bundle_path.parent}/rwkv-last.pth "
                  f"and {self.bundle_path}; continue with the same command plus --resume {self.bundle_path}",
                  file=sys.stderr, flush=True)


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


class ResumeGuard(pl.Callback):
    """Stores what a resumed run must share with the original: the flags, the data seed and the RNG states."""

    def __init__(self, cfg: TrainConfig, samples):
        self.cfg = cfg
        self.samples = samples  # the dataset; its seed is replaced by the bundle's

    def state_dict(self) -> dict:
        name, keys, position, has_gauss, cached = np.random.get_state()
        # tensors and plain Python values only: the bundle loads with torch.load(weights_only=True)
        rng = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.copy()), position, has_gauss,
                                                          cached), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"flags": shaping_flags(self.cfg), "seed": self.samples.seed, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        check_same_flags(state["flags"], self.cfg)
        self.samples.seed = state["seed"]
        torch.set_rng_state(state["rng"]["torch"])
        name, keys, position, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, keys.numpy(), position, has_gauss, cached))
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def shaping_flags(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE_FLAGS}


def check_same_flags(bundle_flags: dict, cfg: TrainConfig) -> None:
    differences = [f"--{name} {bundle_flags.get(name)!r} (bundle) vs {value!r} (now)"
                   for name, value in shaping_flags(cfg).items() if bundle_flags.get(name) != value]
    if differences:
        raise UserInputError(f"--resume {cfg.resume}: the bundle was made with other flags: "
                             f"{'; '.join(differences)}. Resume with the original command plus --resume.")


@dataclass
class Bundle:
    """What a run checks in a resume bundle before it starts."""
    epoch: int  # the mini-epoch it continues in, counted from 0 in the stopped run (0 for a DeepSpeed folder)
    weights: Optional[dict]  # {key: tensor}, memory-mapped; None for a DeepSpeed folder (ResumeGuard checks it)


def open_bundle(cfg: TrainConfig) -> Bundle:
    """The --resume bundle, refused in one line when it is missing, damaged, not a bundle, or made with other
    flags. DeepSpeed writes a folder of sharded states: there only the layout is checked here."""
    path = Path(cfg.resume)
    if path.is_dir():
        if not (path / "checkpoint").is_dir():
            raise UserInputError(f"--resume {path} is a folder but not a DeepSpeed resume bundle (it has no "
                                 f"checkpoint/ inside); pass <proj_dir>/{BUNDLE_NAME} of the stopped run")
        return Bundle(epoch=0, weights=None)
    if not path.is_file():
        raise UserInputError(f"--resume {path}: no such resume bundle (a stopped run writes "
                             f"<proj_dir>/{BUNDLE_NAME})")
    contents = read_pytorch_file(path, "--resume", f"expected the {BUNDLE_NAME} a stopped run writes")
    if not is_resume_bundle(contents):
        weights_file = isinstance(contents, dict) and all(isinstance(v, torch.Tensor) for v in contents.values())
        hint = f"; to start from its weights, use --load_model {path}" if weights_file else ""
        raise UserInputError(f"--resume {path} is not a resume bundle (it holds no training state){hint}")
    guard = contents["callbacks"].get(ResumeGuard.__qualname__)
    if guard is None:
        raise UserInputError(f"--resume {path} is a Lightning checkpoint, but not one a stopped run of this toolkit "
                             f"wrote (it has no ResumeGuard state)")
    check_same_flags(guard["flags"], cfg)
    return Bundle(epoch=contents["epoch"], weights=strip_wrapper_prefix(contents["state_dict"]))


def check_bundle_fits(bundle: Bundle, model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Same flags can still give another model when the data changed (a text file's characters set the
    vocabulary): refuse before Lightning's load raises on the first shape mismatch."""
    if bundle.weights is None:
        return
    problems = weight_mismatches(model.state_dict(), bundle.weights)
    if problems:
        raise UserInputError(f"--resume {cfg.resume} does not fit the model built from these flags and data: "
                             f"{'; '.join(problems)}. Resume with the stopped run's data.")


def retire_bundle(path: str) -> None:
    """Remove the bundle a run resumed from once that run has ended normally: resuming it again would restart
    at the old step and overwrite what the finished run saved."""
    remove_path(Path(path))
    print(f"Removed the resume bundle {path}: the run it continued has ended.", flush=True)
