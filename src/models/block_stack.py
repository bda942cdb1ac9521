"""What every family's model builds from its own forward pieces (src/models/family.py): the whole stack of blocks
with --grad_cp's checkpointing, the forward with the state passed on, and the training loss of a sample. A model
subclasses BlockStack and defines embed, first_carry, run_block, state_of_layers, logits and head_loss, its blocks
in `self.blocks` and its ForwardOptions in `self.options`.
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class BlockStack(nn.Module):
    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def check_continues(self, state) -> None:
        """Refuse to continue from `state` where the model cannot (RWKV-4's windowed features); None: the start."""

    def run_blocks(self, x: torch.Tensor, state=None) -> tuple:
        """Every block from `state` (None: the start) -> (last block's output (B, T, C), the model's state after it).
        With options.grad_cp each block keeps only its inputs and recomputes the rest in backward."""
        self.check_continues(state)
        carry, layers = self.first_carry(x), []
        for i in range(self.n_blocks):
            layer_state = None if state is None else state.layer(i)
            if self.options.grad_cp and torch.is_grad_enabled():
                x, carry, layer_state = checkpoint(self.run_block, i, x, carry, layer_state, use_reentrant=False)
            else:
                x, carry, layer_state = self.run_block(i, x, carry, layer_state)
            layers.append(layer_state)
        return x, self.state_of_layers(layers)

    def forward(self, idx: torch.Tensor, state=None) -> tuple:
        """idx (B, T) token ids -> (logits (B, T, V), state after the last token)."""
        x, state = self.run_blocks(self.embed(idx), state)
        return self.logits(x, idx), state

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of the sample idx (B, T) -> targets (B, T), from the start."""
        x, _ = self.run_blocks(self.embed(idx))
        return self.head_loss(x, targets, idx)
