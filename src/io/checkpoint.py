"""Reading and writing .pth weight files: plain {key: tensor} dicts, written atomically, and the one
comparison of a state dict's keys and shapes against the expected ones.

Every file we write can be loaded by ChatRWKV / the `rwkv` pip package: tensors only, v4neo keys,
no buffers, no wrapper prefixes.
"""
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from src.io.atomic import atomic_file
from src.errors import UserInputError

# Prefixes that Lightning / DeepSpeed wrappers put in front of the model's own keys.
_WRAPPER_PREFIXES = ("_forward_module.", "module.", "model.")
# What marks a LoRA checkpoint, of the original toolkit or of this one: the keys of adapter pairs
# (blocks.3.att.key.lora_A), or the settings record src/lora/adapters.py writes under LORA_SETTINGS_KEY.
_LORA_SUFFIXES = (".lora_A", ".lora_B")
LORA_SETTINGS_KEY = "lora_settings"


def is_lora_checkpoint(weights: dict) -> bool:
    """A LoRA checkpoint (adapters and the tensors LoRA trains whole, no base model), not a whole model."""
    return any(key == LORA_SETTINGS_KEY or key.endswith(_LORA_SUFFIXES) for key in weights)


def atomic_save(obj, path, size: int = 0, replace: bool = True) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (without `replace`, only
    if no file appeared there meanwhile); `size` (bytes) is what a full disk's message says the file needs."""
    with atomic_file(path, size, replace) as f:
        torch.save(obj, f)


def save_weights(state_dict: dict, path, dtype: torch.dtype = None, replace: bool = True) -> None:
    """Save a model state dict as a plain CPU {key: tensor} file, optionally cast to `dtype` (`replace`: see
    atomic_save)."""
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    atomic_save(out, path, size=sum(t.numel() * t.element_size() for t in out.values()), replace=replace)


def load_weights(path, what: str = "--load_model") -> dict:
    """Load a {key: tensor} .pth file onto the CPU, with one clear message for each way it can be wrong."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{what} {path} is a folder; {what} takes a .pth file of weights{_pth_files_in(path)}")
    if not path.exists():
        hint = f" (did you mean {path}.pth?)" if path.with_name(path.name + ".pth").is_file() else ""
        raise UserInputError(f"{what}: file not found: {path}{hint}")
    if not path.is_file():  # a reader would wait on a named pipe for ever
        raise UserInputError(f"{what} {path} is not a regular file (a named pipe or a device); {what} takes a .pth "
                             f"file of weights")
    expected = "expected a .pth of {name: tensor} as torch.save writes it (an RWKV checkpoint)"
    weights = read_pytorch_file(path, what, expected)
    if is_resume_bundle(weights):
        raise UserInputError(f"{what}: {path} is a resume bundle, not weights; continue its run with --resume {path}")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserInputError(f"{what}: {path} does not hold a plain state dict of tensors; {expected}")
    return strip_wrapper_prefix(weights)


def _pth_files_in(folder: Path, shown: int = 4) -> str:
    """", e.g. out/rwkv-final.pth or out/rwkv-3.pth" for the .pth files in `folder` (a run's --proj_dir), newest
    first; a resume bundle folder (DeepSpeed's rwkv-resume.ckpt) is named as such."""
    if (folder / "checkpoint").is_dir():
        return f" (this looks like a resume bundle: continue its run with --resume {folder})"
    try:
        files = sorted(folder.glob("*.pth"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return ""
    names = [str(p) for p in files if p.is_file()]
    return f", e.g. {' or '.join(names[:shown])}" if names else ""


def read_pytorch_file(path: Path, what: str, expected: str):
    """torch.load with weights_only=True onto the CPU (memory-mapped unless the file has the legacy format).

    A file torch cannot read gets one line saying what it is not and what `expected` is, never torch's own
    advice to retry with weights_only=False, which would run whatever code an untrusted file carries.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as mmap_error:
            if "mmap" not in str(mmap_error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise UserInputError(f"{what}: {path} {_why_unreadable(path, e)}; {expected}")


def _why_unreadable(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes zip archives
    if not is_zip:
        return "is not a PyTorch file"
    try:
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile:
        return "is a damaged PyTorch file (truncated or corrupted)"
    if isinstance(error, pickle.UnpicklingError):
        return "holds Python objects besides tensors, which are not loaded (loading them could run any code)"
    return f"is a damaged PyTorch file ({type(error).__name__})"


def is_resume_bundle(contents) -> bool:
    """A Lightning checkpoint as a stopped run writes it (weights, optimizer, loops and callback states)."""
    return isinstance(contents, dict) and {"state_dict", "loops", "callbacks"} <= contents.keys()


def strip_wrapper_prefix(weights: dict) -> dict:
    """Drop prefixes such as `_forward_module.model.` that every key of a wrapped model carries."""
    stripped = True
    while stripped and weights:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in weights):
                weights = {k[len(prefix):]: v for k, v in weights.items()}
                stripped = True
    return weights


def check_compatible(expected: dict, weights: dict, path, shape_flags, allow_missing: bool = False) -> None:
    """Refuse `weights` unless its keys and shapes match `expected` (a model's state dict), listing every difference
    and the flags (`shape_flags`, its family's) that decide the shapes."""
    if is_lora_checkpoint(weights):
        raise UserInputError(f"--load_model {path} is a LoRA file (adapters only, no base model); pass the base model "
                             f"to --load_model and this file to --lora_load, with --lora (or merge the two with "
                             f"merge_lora.py)")
    problems = weight_mismatches(expected, weights, allow_missing)
    if problems:
        raise UserInputError(
            f"--load_model {path} does not fit the model built from the flags: " + "; ".join(problems)
            + f". Check {', '.join('--' + name for name in shape_flags)} against the "
              "checkpoint" + ("" if allow_missing else " (or pass --load_partial 1 to keep fresh values for "
                                                         "missing keys)") + ".")


def weight_mismatches(expected: dict, weights: dict, allow_missing: bool = False) -> list:
    """Missing and unexpected keys and shape differences of `weights` against `expected`, one entry per kind."""
    differences = compare_weights(expected, weights)
    mismatched = [f"{k}: file {_shape(weights[k])} vs model {_shape(expected[k])}"
                  for k in differences.mismatched]
    problems = []
    if differences.missing and not allow_missing:
        problems.append(f"missing keys ({len(differences.missing)}): {_short_list(differences.missing)}")
    if differences.unexpected:
        problems.append(f"unexpected keys ({len(differences.unexpected)}): {_short_list(differences.unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short_list(mismatched)}")
    return problems


@dataclass
class WeightDifferences:
    """How the keys and shapes of a state dict differ from the expected ones. False when they do not."""
    missing: list  # keys of the expected dict that the other lacks, in expected order
    unexpected: list  # keys of the other dict that are not expected, in its order
    mismatched: list  # keys of both whose shapes differ, in expected order

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def compare_weights(expected: dict, actual: dict) -> WeightDifferences:
    """Compare two {key: tensor or shape tuple} dicts by keys and shapes; the values themselves are not read.
    The one key/shape comparison of the toolkit: loading models, LoRA files, resume bundles and merges use it."""
    return WeightDifferences(
        missing=[k for k in expected if k not in actual],
        unexpected=[k for k in actual if k not in expected],
        mismatched=[k for k in expected if k in actual and _shape(actual[k]) != _shape(expected[k])])


def _shape(value) -> tuple:
    """The shape of a tensor, or a shape given as a tuple."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _short_list(items: list, limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
