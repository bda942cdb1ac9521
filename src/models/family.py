"""What a model family is to the rest of the toolkit: one record per architecture (ModelFamily), answering every
question training, LoRA, merging, evaluation, --state_cp, the memory check and HF export ask about a model.
Nothing outside src/models/<family>/ names a family's parameters, parts, state layout or HF class.

A family's model (what `build` returns) is an nn.Module with the forward pieces the segment engine
(src/train/state_cp/engine.py) and evaluation (src/eval/engine.py) drive, and with attributes
`family_name` (its record's name in the registry) and `cfg` (its shape):
    embed(idx)                                  token ids (B, T) -> x (B, T, C), the first block's input
    first_carry(x)                              what the blocks pass each other besides x: a tuple of tensors
                                                (RWKV-7's v_first; () for a family with nothing to pass)
    run_block(i, x, carry, layer_state)         block i -> (x, carry, the layer's new state); layer_state None
                                                is the start of a sequence
    state_of_layers(layer states), n_blocks     the whole model's state (a named tuple of tensors with layer(i))
    logits(x, idx), head_loss(x, targets, idx, count, positions), token_losses(x, targets)
    run_blocks(x, state), forward(idx, state) -> (logits, state), loss(idx, targets): from BlockStack
    (src/models/block_stack.py), which a model subclasses
Running a sequence in one call or in segments with the state passed on gives the same results.

No torch import here or in a family's record, so command-line checks ask the rules without loading torch; the
methods that build or read models import it when called.
"""
import dataclasses
from typing import Optional, Union

from src.errors import UserInputError

EMBEDDING = "embedding"  # the piece of the forward that maps token ids to the first block's input
HEAD = "head"  # everything after the last block: the final norm, the head, the loss


class ModelFamily:
    """A model family. Subclasses set the class attributes and implement the methods that raise
    NotImplementedError; the others have answers that hold for any family."""
    name: str = ""  # the registry's key, e.g. "rwkv4"
    title: str = ""  # how messages name it, e.g. "RWKV-4"
    my_testing: str = ""  # the --my_testing value that picks it for a run from scratch ("" for the default family)
    lora_parts: tuple = ()  # the --lora_parts names it understands
    flag_group = None  # a dataclass of its own train.py flags (src/flags.py flag fields), or None
    shape_flags: tuple = ("n_layer", "n_embd", "vocab_size")  # the flags that decide its state dict's shapes
    hf_refusal: str = "transformers has no class for it"  # why export_hf.py refuses it, where hf_format() is None

    # ---------------------------------------------------------------- flags (no torch)

    def check_flags(self, flags) -> None:
        """Refuse train.py / evaluate.py flags that make no sense for this family, one line each."""

    def fill_flag_defaults(self, flags) -> None:
        """Fill the shape flags whose 0 means "this family's default" (widths, ...)."""

    def windowed_features(self, flags) -> list:
        """Flag names of features that see the whole window at once, so --state_cp cannot train them."""
        return []

    def shape_from_flags(self, flags, vocab_size: int):
        """The model's shape (a dataclass) that train.py's flags describe."""
        raise NotImplementedError

    def forward_options(self, flags):
        """How the forward runs (--grad_cp, --wkv_backend, --ctx_parts, --compile): never what it computes."""
        raise NotImplementedError

    # ---------------------------------------------------------------- weights (no torch)

    def detect(self, weights: dict) -> bool:
        """Whether a state dict's keys are this family's."""
        raise NotImplementedError

    def canonical_weights(self, weights: dict) -> dict:
        """`weights` (detected as this family's) in the layout this toolkit's model holds: tensors another trainer
        writes but the model never reads are left out. Every file read as a model passes through it."""
        return weights

    def shape_of_weights(self, weights: dict, path: str = "base"):
        """The shape whose state dict has the keys and shapes of `weights`, or a UserInputError naming `path`."""
        raise NotImplementedError

    def flags_of_weights(self, weights: dict, path: str = "base") -> dict:
        """{flag: value} of the shape flags a file decides where a run leaves them to the family's rule (0): a
        released model's own widths. Default: none (the flags must name the file's shape)."""
        return {}

    def identity(self, shape) -> dict:
        """The shape fields a LoRA records of its base, so it is not merged into another model."""
        return {"family": self.name, **dataclasses.asdict(shape)}

    # ---------------------------------------------------------------- models (torch)

    def build(self, shape, options=None):
        """The model (see the module docstring), its parameters constructed (on the current default device)."""
        raise NotImplementedError

    def init_weights(self, model, lr_init: float, device=None, dtype=None) -> dict:
        """A fresh state dict by the family's initialisation rules, on the CPU in `dtype`."""
        raise NotImplementedError

    def from_weights(self, shape, weights: dict, device, path: str = "base"):
        """An fp32 model on `device` holding `weights`, in eval mode, with reference kernels (a check on a few tokens
        needs no kernel build). Strict: the keys and shapes must be exactly those of `shape`'s model."""
        import torch

        from src.io.checkpoint import weight_mismatches

        with torch.device("meta"):  # no allocation or init for weights about to be replaced
            model = self.build(shape, self.reference_options())
        problems = weight_mismatches(model.state_dict(), weights)
        if problems:
            raise UserInputError(f"{path} does not have the layout of an {self.title} model: {'; '.join(problems)}; "
                                 f"it is damaged or was edited: pass the file as its run or release wrote it.")
        model.load_state_dict({k: v.to(device, torch.float32) for k, v in weights.items()}, assign=True)
        return model.eval()

    def reference_options(self):
        """Forward options that run the plain-torch twins of every kernel."""
        raise NotImplementedError

    # ---------------------------------------------------------------- anatomy (no torch)

    def piece_of(self, name: str) -> Union[str, int]:
        """The piece of the forward whose computation uses the parameter: EMBEDDING, a block number, or HEAD."""
        raise NotImplementedError

    def layer_of(self, name: str) -> Optional[int]:
        """The block number of a block's parameter, else None."""
        piece = self.piece_of(name)
        return piece if isinstance(piece, int) else None

    def lr_multiplier(self, name: str, pile_stage_2: bool = False) -> float:
        """The LR multiplier of --layerwise_lr 1."""
        return 1.0

    def weight_decayed(self, name: str, shape) -> bool:
        """Whether --weight_decay applies to the parameter: the matrices (two dimensions once squeezed)."""
        return len([size for size in shape if size != 1]) >= 2

    def lora_projections(self, shape, parts, layers) -> list:
        """Names of the Linear layers LoRA wraps for `parts` in `layers`, in order."""
        return []

    def trained_whole_part(self, name: str) -> Optional[str]:
        """The LoRA part that trains this tensor whole, else None."""
        return None

    # ---------------------------------------------------------------- transformers' format

    def hf_format(self):
        """The module that converts this family to and from transformers' format (imports torch), or None."""
        return None

    # ---------------------------------------------------------------- estimates (no torch)

    def activation_bytes(self, shape, batch: int, tokens: int, dtype_bytes: int, checkpointed: bool,
                         inputs_on_device: bool = True, wkv_kernel: bool = True) -> int:
        """What the blocks keep for their backward over batch x tokens, in bytes (see src/train/memory_check.py).
        `wkv_kernel`: the family's GPU kernel runs the WKV operator (a GPU run without --wkv_backend torch), whose
        memory may differ from its plain-torch twin's."""
        raise NotImplementedError
