"""`--resume <bundle>`: a run stopped by Ctrl+C / SIGTERM (src/train/stopping.py wrote its bundle) continues exactly
where it stopped. The flags that shape the run must match the bundle's; the bundle is checked before anything is
written, and removed when the resumed run ends normally (its state then lies behind the files that run wrote).
"""
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch

from src.io.atomic import remove_path
from src.io.checkpoint import is_resume_bundle, read_pytorch_file, strip_wrapper_prefix, weight_mismatches
from src.errors import UserInputError
from src.io.outputs import BUNDLE_NAME

# Flags that may change between a run and its resumption (they do not change the training maths).
RESUME_FREE_FLAGS = {"resume", "load_model", "lora_load", "proj_dir", "wandb", "enable_progress_bar", "max_epochs",
                     "max_steps", "random_seed", "debug", "timestamp", "wkv_backend", "compile", "log_add_step",
                     "overwrite_proj_dir",
                     "lora_settings",  # derived from --lora_* flags, which are compared
                     "rule_filled",  # derived: which shape flags the rule filled (the values themselves are compared)
                     "valid_data_file", "valid_data_type", "valid_every", "valid_tokens"}  # held-out loss: reads only



class ResumeGuard(pl.Callback):
    """Stores what a resumed run must share with the original: the flags, the data seed and the RNG states.
    `flags`: the run's shaping_flags; `resume`: --resume (the bundle a resumed run continues, for messages)."""

    def __init__(self, flags: dict, resume: str, samples):
        self.flags = flags
        self.resume = resume
        self.samples = samples  # the dataset; its seed is replaced by the bundle's

    def state_dict(self) -> dict:
        name, keys, position, has_gauss, cached = np.random.get_state()
        # tensors and plain Python values only: the bundle loads with torch.load(weights_only=True)
        rng = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.copy()), position, has_gauss,
                                                          cached), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"flags": self.flags, "seed": self.samples.seed, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        check_same_flags(state["flags"], self.flags, self.resume)
        self.samples.seed = state["seed"]
        torch.set_rng_state(state["rng"]["torch"])
        name, keys, position, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, keys.numpy(), position, has_gauss, cached))
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def shaping_flags(cfg) -> dict:
    """The flags a resumed run must share with its bundle: every flag of train.py's `cfg` (src/config.py) but
    RESUME_FREE_FLAGS, so this one function reads the whole config."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE_FLAGS}


def check_same_flags(bundle_flags: dict, flags: dict, resume: str) -> None:
    """`flags`: this run's shaping_flags; `resume`: its --resume."""
    differences = [f"--{name} {bundle_flags.get(name)!r} (bundle) vs {value!r} (now)"
                   for name, value in flags.items() if bundle_flags.get(name) != value]
    if differences:
        raise UserInputError(f"--resume {resume}: the bundle was made with other flags: "
                             f"{'; '.join(differences)}. Resume with the original command plus --resume.")


@dataclass
class Bundle:
    """What a run checks in a resume bundle before it starts."""
    epoch: int  # the mini-epoch it continues in, counted from 0 in the stopped run (0 for a DeepSpeed folder)
    weights: Optional[dict]  # {key: tensor}, memory-mapped; None for a DeepSpeed folder (ResumeGuard checks it)
    steps: Optional[int] = None  # the optimizer steps the stopped run had taken; None for a DeepSpeed folder


def open_bundle(resume: str, flags: dict) -> Bundle:
    """The --resume bundle, refused in one line when it is missing, damaged, not a bundle, or made with other
    flags than `flags` (this run's shaping_flags). DeepSpeed writes a folder of sharded states: there only the layout
    is checked here."""
    path = Path(resume)
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
    check_same_flags(guard["flags"], flags, resume)
    return Bundle(epoch=contents["epoch"], weights=strip_wrapper_prefix(contents["state_dict"]),
                  steps=contents.get("global_step"))


def check_steps_left(bundle: Bundle, max_steps: int, resume: str) -> None:
    """Refuse a --max_steps the stopped run has already reached: the resumed run would train nothing."""
    if bundle.steps is not None and 0 <= max_steps <= bundle.steps:
        raise UserInputError(f"--resume {resume}: the stopped run took {bundle.steps} optimizer steps, and --max_steps "
                             f"{max_steps} leaves none to train; pass a larger --max_steps, or -1 for none")


def check_bundle_fits(bundle: Bundle, model: torch.nn.Module, resume: str) -> None:
    """Same flags can still give another model when the data changed (a text file's characters set the
    vocabulary): refuse before Lightning's load raises on the first shape mismatch."""
    if bundle.weights is None:
        return
    problems = weight_mismatches(model.state_dict(), bundle.weights)
    if problems:
        raise UserInputError(f"--resume {resume} does not fit the model built from these flags and data: "
                             f"{'; '.join(problems)}. Resume with the stopped run's data.")


def retire_bundle(path: str) -> None:
    """Remove the bundle a run resumed from once that run has ended normally: resuming it again would restart
    at the old step and overwrite what the finished run saved."""
    remove_path(Path(path))
    print(f"Removed the resume bundle {path}: the run it continued has ended.", flush=True)
