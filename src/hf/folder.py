"""A Hugging Face transformers model folder of a model family that transformers has a class for (the family's
hf_format module names it: RWKV-4's is RwkvForCausalLM): written by transformers itself, read back as
{name: tensor}, loaded as transformers loads it.

    config.json, generation_config.json   transformers' config of the family and generation defaults
    model.safetensors                      the weights (or model-0000k-of-0000n.safetensors shards with
                                           model.safetensors.index.json, above save_pretrained's shard size)
    pytorch_model.bin (+ shards, index)    read too: older checkpoints on the Hub have this format

transformers is imported inside the functions: it takes seconds to import, and only these commands need it.
"""
import contextlib
import json
from pathlib import Path

import torch

from src.io.checkpoint import read_pytorch_file
from src.errors import UserInputError

# (index of shards, single file) of each weight format transformers writes, the current one first
WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))


@contextlib.contextmanager
def quiet_transformers():
    """Within the block transformers logs errors only and draws no progress bars (loading, writing shards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def write_model(folder, hf_format, config: dict, weights: dict, dtype: torch.dtype) -> None:
    """Save the transformers model of `hf_format` (a family's module) with its config class (**config) and `weights`
    ({transformers name: tensor} in `dtype`) into `folder` by transformers' own save_pretrained. The model is built
    on the meta device and given the tensors themselves, so no copy of the weights is made."""
    config_class, model_class = hf_format.transformers_classes()
    with quiet_transformers():
        with torch.device("meta"):
            model = model_class(config_class(**config, dtype=dtype))
        model.load_state_dict(weights, strict=True, assign=True)
        model.save_pretrained(folder)


def load_model(folder, hf_format, **config_overrides):
    """The transformers model class of `hf_format` (a family's module) .from_pretrained(folder) in fp32 and eval
    mode, as a user's script loads it."""
    _, model_class = hf_format.transformers_classes()
    with quiet_transformers():
        try:
            model = model_class.from_pretrained(folder, dtype=torch.float32, **config_overrides)
        except Exception as e:  # transformers raises many types for a folder it cannot load
            raise UserInputError(f"transformers cannot load {folder}: {type(e).__name__}: {_first_line(e)}")
    return model.eval()


def read_config(folder) -> dict:
    """config.json of a model folder as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder} is not a folder; give the folder of a transformers model (config.json and "
                             f"its weights).")
    path = folder / "config.json"
    if not path.is_file():
        raise UserInputError(f"{folder} has no config.json, so it is not a transformers model folder.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path} cannot be read as JSON ({_first_line(e)}).")
    if not isinstance(config, dict):
        raise UserInputError(f"{path} holds a JSON {type(config).__name__}, not the object of a model config.")
    return config


def read_weights(folder) -> dict:
    """Every tensor of a model folder, {transformers name: tensor}, on the CPU in its stored dtype."""
    folder = Path(folder)
    for index_name, single_name in WEIGHT_FILES:
        if (folder / index_name).is_file():
            return _read_shards(folder / index_name)
        if (folder / single_name).is_file():
            return _read_weight_file(folder / single_name)
    raise UserInputError(f"{folder} holds no weights: none of {', '.join(n for pair in WEIGHT_FILES for n in pair)}.")


def _read_shards(index_path: Path) -> dict:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserInputError(f"{index_path} is not an index of weight shards ({_first_line(e)}).")
    weights = {}
    for shard in shards:
        path = index_path.parent / shard
        if not path.is_file():
            raise UserInputError(f"{index_path} lists the shard {shard}, which is missing; download it again.")
        weights.update(_read_weight_file(path))
    unlisted = sorted(set(weight_map) - set(weights))
    if unlisted:
        raise UserInputError(f"{index_path} places {unlisted[0]} in a shard that does not hold it; the download is "
                             f"damaged.")
    return weights


def _read_weight_file(path: Path) -> dict:
    expected = "expected weights as transformers saves them"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserInputError(f"{path} is a damaged safetensors file ({_first_line(e)}); {expected}.")
    weights = read_pytorch_file(path, "weights file", expected)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserInputError(f"weights file {path} does not hold a {{name: tensor}} dict; {expected}.")
    return weights


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
