"""Reading and writing .pth weight files: plain {key: tensor} dicts, written atomically.

Every file we write can be loaded by ChatRWKV / the `rwkv` pip package: tensors only, v4neo keys,
no buffers, no wrapper prefixes.
"""
import contextlib
import os
import shutil
from pathlib import Path

import torch

from src.config import UserInputError

# Prefixes that Lightning / DeepSpeed wrappers put in front of the model's own keys.
_WRAPPER_PREFIXES = ("_forward_module.", "module.", "model.")


# Temporary files and folders being written right now; a hard exit (second Ctrl+C) removes them.
_IN_FLIGHT: set = set()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` for the caller to write and then `publish(tmp, path)`.

    Works for files and folders (a DeepSpeed resume bundle is a folder written by every rank, so the
    temporary name is the same on all ranks). If the block raises, or a hard exit calls
    `remove_partial_files`, the temporary path is deleted and the old `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    _IN_FLIGHT.add(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        _IN_FLIGHT.discard(tmp)


def publish(tmp: Path, path) -> None:
    """Move a finished temporary file or folder over `path` (an old folder is swapped out, then removed)."""
    path = Path(path)
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        remove_path(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partial_files() -> None:
    """Delete whatever atomic writes are in progress (called just before a hard exit)."""
    for tmp in list(_IN_FLIGHT):
        remove_path(tmp)


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)


def save_weights(state_dict: dict, path, dtype: torch.dtype = None) -> None:
    """Save a model state dict as a plain CPU {key: tensor} file, optionally cast to `dtype`."""
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    atomic_save(out, path)


def load_weights(path, what: str = "--load_model") -> dict:
    """Load a {key: tensor} .pth file onto the CPU, with one clear message for each way it can be wrong."""
    path = Path(path)
    if not path.is_file():
        hint = f" (did you mean {path}.pth?)" if path.with_name(path.name + ".pth").is_file() else ""
        raise UserInputError(f"{what}: file not found: {path}{hint}")
    try:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as mmap_error:
            if "mmap" not in str(mmap_error):
                raise
            weights = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise UserInputError(f"{what}: {path} is not a readable PyTorch weights file ({type(e).__name__}: {e})")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserInputError(f"{what}: {path} does not hold a plain state dict of tensors")
    return strip_wrapper_prefix(weights)


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


def check_compatible(expected: dict, weights: dict, path, allow_missing: bool = False) -> None:
    """Refuse `weights` unless its keys and shapes match `expected` (a model's state dict), listing every difference."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in weights and weights[k].shape != expected[k].shape]
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short_list(mismatched)}")
    if problems:
        raise UserInputError(
            f"--load_model {path} does not fit the model built from the flags: " + "; ".join(problems)
            + ". Check --n_layer, --n_embd, --vocab_size, --dim_att, --dim_ffn, --pre_ffn, --head_qk against the "
              "checkpoint" + ("" if allow_missing else " (or pass --load_partial 1 to keep fresh values for "
                                                         "missing keys)") + ".")


def _short_list(items: list, limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
