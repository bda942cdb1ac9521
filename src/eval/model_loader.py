"""The model evaluate.py evaluates: a whole-model .pth (this toolkit's, or a released RWKV-4: Pile, Raven, World)
whose family and shape are read from its weights, optionally with a LoRA checkpoint on top, on a device in one dtype.

The LoRA is applied as training applies it, not merged: each lora_A/lora_B pair of the file wraps its Linear
(src/lora/adapters.py LoraLinear, scale alpha / r) and the time_* / ln tensors it trained replace the base's. So the
model computes what the LoRA run's model computed, and a LoRA run's held-out evaluation rows (src/train/held_out.py) are
reproduced exactly. Files of the original toolkit, which store no settings, need their alpha (--lora_alpha).
"""
from pathlib import Path
from typing import Optional

import torch

from src.io.checkpoint import is_lora_checkpoint, load_weights, weight_mismatches
from src.data.dataset import read_char_vocab
from src.data.jsonl_lines import check_input_file
from src.errors import UserInputError
from src.lora.adapters import attach_lora
from src.lora.merge import LoraCheckpoint, check_fits_base, resolve_alpha
from src.models import read_model_weights


def load_model(path, lora_path: str = "", lora_alpha: Optional[float] = None, device="cpu",
               dtype: torch.dtype = torch.float32, flags=None) -> torch.nn.Module:
    """The model of `path` (+ the LoRA of `lora_path`) on `device` in `dtype`, in eval mode, its forward run as
    the flags' --grad_cp, --wkv_backend, --ctx_parts and --compile say (None: its family's defaults)."""
    weights = load_weights(path, what="--load_model")
    if is_lora_checkpoint(weights):
        raise UserInputError(f"--load_model {path} is a LoRA checkpoint, not a whole model: pass the base model it "
                             f"was trained on as --load_model and {path} as --lora_load")
    family, weights = read_model_weights(weights, f"--load_model {path}")
    cfg = family.shape_of_weights(weights, f"--load_model {path}")
    lora = None
    if lora_path:
        lora = LoraCheckpoint.from_weights(load_weights(lora_path, what="--lora_load"), lora_path)
        check_fits_base(lora, weights, family, cfg, path)
        lora_alpha = resolve_alpha(lora_alpha, lora, given_as="--lora_alpha")
        weights = {**weights, **lora.replaced}
    elif lora_alpha is not None:
        raise UserInputError("--lora_alpha is the alpha of a --lora_load file; pass the file too, or leave it out")
    with torch.device("meta"):  # no memory or initialisation for values about to be replaced
        model = family.build(cfg, None if flags is None else family.forward_options(flags))
    problems = weight_mismatches(model.state_dict(), weights)
    if problems:
        raise UserInputError(f"--load_model {path} does not have the layout of an {family.title} model: "
                             f"{'; '.join(problems)}; it is damaged or was edited: pass the file as its run or "
                             f"release wrote it")
    model.load_state_dict({k: v.to(device, dtype, copy=True) for k, v in weights.items()}, assign=True)
    if lora is not None:
        with torch.no_grad():
            for prefix, (lora_A, lora_B) in lora.pairs.items():
                module = attach_lora(model, prefix, lora_A.shape[0], lora_alpha / lora_A.shape[0])
                module.lora_A.copy_(lora_A)
                module.lora_B.copy_(lora_B)
    return model.eval()


def check_tokenizer_fits(vocab_file: str, vocab_size: int, path) -> None:
    """Refuse a tokenizer (--vocab_file) whose vocabulary is not the model's: the same size, or that size padded up to
    a multiple of 64 as some models' embeddings are. Token ids of another vocabulary mean other text to the model."""
    from src.data.tokenizer import locate_tokenizer_file, tokenizer_for_file

    if not vocab_file:
        return  # the data's own check asks for it
    check_input_file("--vocab_file", locate_tokenizer_file(vocab_file), "the tokenizer's file")
    size = tokenizer_for_file(vocab_file).vocab_size
    if vocab_size not in (size, -(-size // 64) * 64):
        raise UserInputError(f"--vocab_file {vocab_file} has a vocabulary of {size:,} tokens and {path} one of "
                             f"{vocab_size:,}: the model was trained with another tokenizer; pass the one it was "
                             f"trained with (20B_tokenizer.json: 50,277 tokens; rwkv_vocab_v20230424.txt: 65,536)")


def characters_of(path, vocab_file: str = "") -> list:
    """The characters of a character-level model: `vocab_file`, or the vocab.json its run wrote beside it."""
    vocab = Path(vocab_file) if vocab_file else Path(path).parent / "vocab.json"
    if not vocab.is_file():
        if vocab.exists():  # a folder, a named pipe (a reader would wait on it for ever)
            check_input_file("--vocab_file", vocab, f"the vocab.json of the run that trained {path}")
        raise UserInputError(f"character-level data is numbered by the characters of the model's training text: "
                             f"{vocab} not found; pass the vocab.json of the run that trained {path} with "
                             f"--vocab_file")
    return read_char_vocab(vocab)
