"""RWKV-4 ("v4neo") as a plain nn.Module whose forward takes and returns the recurrent state.

State-dict keys and shapes are those of RWKV-LM v4neo, so released RWKV-4 .pth files load strictly.
With C = n_embd, A = dim_att, F = dim_ffn, V = vocab_size:

    emb.weight [V,C]; blocks.0.ln0.{weight,bias} [C]; blocks.i.ln1/ln2.{weight,bias} [C]
    blocks.i.att.time_decay [A], time_first [A], time_mix_k/v/r [1,1,C]
    blocks.i.att.key/value/receptance.weight [A,C], att.output.weight [C,A]
    blocks.i.ffn.time_mix_k/r [1,1,C], ffn.key.weight [F,C], ffn.receptance.weight [C,C], ffn.value.weight [C,F]
    ln_out.{weight,bias} [C]; head.weight [V,C]
    optional: blocks.0.ffnPre.* (pre_ffn), head_q/head_k.weight [H,C] (head_qk),
              blocks.L.tiny_ln/tiny_q/tiny_k/tiny_v (tiny attention), blocks.0.pos_emb_x/y (my_pos_emb)

The forward is built from the pieces every family's model has (src/models/family.py), which the segment engine of
--state_cp (src/train/state_cp/engine.py) also drives one at a time, so there is one forward:
    embed(idx)                             token ids (B, T) -> x_emb (B, T, C)
    first_carry(x_emb)                     what blocks pass on besides x: (x_emb,) for tiny attention, else ()
    run_block(i, x, carry, layer_state)    block i from its layer's state -> (x, carry, the layer's new state);
                                           state_of_layers(new layer states) -> RWKVState
    run_blocks(x_emb, state)               every block (with --grad_cp's checkpointing) -> (x, RWKVState)
    logits(x, idx)                         ln_out, head (and head_qk) -> (B, T, V)
    head_loss(x, targets, ...)             ln_out, head and the training loss, without [B, T, V] logits
    token_losses(x, targets)               each target's cross-entropy for held-out evaluation, without them
    forward(idx, state) = logits(run_blocks(embed(idx), state)), with the state after the last token
    loss(idx, targets)  = head_loss(run_blocks(embed(idx)))
(run_blocks, forward and loss come from src/models/block_stack.py, shared by every family's model)
Running a sequence in one call, or in segments with the state passed on, gives the same logits.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.loss import IGNORE_INDEX, head_loss, head_token_losses, language_model_loss
from src.models.block_stack import BlockStack
from src.models.rwkv4 import elementwise
from src.models.rwkv4.config import ForwardOptions, RWKVConfig
from src.models.rwkv4.state import RWKVState, empty_state
from src.models.rwkv4.wkv import wkv


def _layer_ratios(layer_id: int, n_layer: int) -> tuple:
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0  # the original divides by zero at n_layer 1
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def _channel_ramp(n_embd: int) -> torch.Tensor:
    """ddd[0, 0, i] = i / C, the base of the time_mix initialisation."""
    return (torch.arange(n_embd, dtype=torch.float32) / n_embd).reshape(1, 1, n_embd)


class TimeMix(nn.Module):
    """RWKV-4 attention replacement: token shift, K/V/R projections, WKV, sigmoid(R) gate."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, options: ForwardOptions):
        super().__init__()
        self.options = options  # the model's, shared: how the WKV operator runs
        C, A = cfg.n_embd, cfg.dim_att
        ratio_0_to_1, ratio_1_to_almost0 = _layer_ratios(layer_id, cfg.n_layer)
        ddd = _channel_ramp(C)
        h = torch.arange(A, dtype=torch.float32)
        # decay speeds from -5 to 3 across channels, steeper curve in deeper layers
        self.time_decay = nn.Parameter(-5 + 8 * (h / max(A - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((h + 1) % 3 - 1) * 0.5
        self.time_first = nn.Parameter(torch.full((A,), math.log(0.3)) + zigzag)
        self.time_mix_k = nn.Parameter(ddd ** ratio_1_to_almost0)
        self.time_mix_v = nn.Parameter(ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ddd ** (0.5 * ratio_1_to_almost0))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, x, shift, wkv_state):
        """x (B, T, C); shift (B, C) or None; wkv_state (B, A, 3) or None -> (out, new shift, new wkv state)."""
        ops = elementwise.ops(self.options.fused, x)
        xk, xv, xr = ops.shifted_mixes(x, shift, (self.time_mix_k, self.time_mix_v, self.time_mix_r))
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)  # (B, T, A)
        y, wkv_state = wkv(self.time_decay, self.time_first, k, v, wkv_state,
                           backend=self.options.wkv_backend, part_len=self.options.ctx_part_len)
        return self.output(ops.gate(r, y)), last_token(x), wkv_state


def last_token(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> its last token (B, C), the shift state a block passes on, as a tensor of its own: a view
    x[:, -1] would keep all of x alive for as long as the state lives (a segment's forward holds every layer's
    state until the last block: at 7B and 4096 tokens, 2 GiB of normalised inputs)."""
    return x[:, -1].clone()


class ChannelMix(nn.Module):
    """RWKV-4 feed-forward: token shift, squared-ReLU key, sigmoid receptance gate."""

    def __init__(self, cfg: RWKVConfig, layer_id: int, options: ForwardOptions):
        super().__init__()
        self.options = options  # the model's, shared: whether the elementwise work runs fused
        C = cfg.n_embd
        _, ratio_1_to_almost0 = _layer_ratios(layer_id, cfg.n_layer)
        ddd = _channel_ramp(C)
        self.time_mix_k = nn.Parameter(ddd ** ratio_1_to_almost0)
        self.time_mix_r = nn.Parameter(ddd ** ratio_1_to_almost0)
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, residual, x, shift):
        """residual: the block's stream (B, T, C), x: its normalised copy (B, T, C); shift (B, C) or None
        -> (residual + this layer's output, new shift)."""
        ops = elementwise.ops(self.options.fused, x)
        xk, xr = ops.shifted_mixes(x, shift, (self.time_mix_k, self.time_mix_r))
        k = ops.squared_relu(self.key(xk))  # (B, T, F)
        return ops.gated_residual(residual, self.receptance(xr), self.value(k)), last_token(x)


class Block(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int, options: ForwardOptions):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        C = cfg.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
            if cfg.my_pos_emb > 0:
                self.pos_emb_x = nn.Parameter(torch.zeros(1, cfg.my_pos_emb, C))
                self.pos_emb_y = nn.Parameter(torch.zeros(cfg.my_pos_emb, 1, C))
        if layer_id == 0 and cfg.pre_ffn > 0:
            self.ffnPre = ChannelMix(cfg, 0, options)
        else:
            self.att = TimeMix(cfg, layer_id, options)
        self.ffn = ChannelMix(cfg, layer_id, options)
        if cfg.has_tiny_att and layer_id == cfg.tiny_att_layer:
            self.tiny_ln = nn.LayerNorm(C)
            self.tiny_q = nn.Linear(C, cfg.tiny_att_dim, bias=False)
            self.tiny_k = nn.Linear(C, cfg.tiny_att_dim, bias=False)
            self.tiny_v = nn.Linear(C, C, bias=False)

    def forward(self, x, x_emb, att_shift, wkv_state, ffn_shift):
        """x, x_emb (B, T, C) -> (x, att_shift (B, C), wkv_state (B, A, 3), ffn_shift (B, C))."""
        B, T, C = x.shape
        if self.layer_id == 0:
            x = self.ln0(x)
            if self.cfg.my_pos_emb > 0:
                grid = self.cfg.my_pos_emb ** 2
                if T > grid:
                    raise ValueError(f"--my_pos_emb {self.cfg.my_pos_emb} covers {grid} positions, fewer than {T}")
                x = x + (self.pos_emb_x + self.pos_emb_y).reshape(grid, C)[:T]
        if hasattr(self, "ffnPre"):
            x, att_shift = self.ffnPre(x, self.ln1(x), att_shift)
            if wkv_state is None:
                wkv_state = empty_state(B, self.cfg.dim_att, x.device)
        else:
            dx, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
            x = x + dx
        x, ffn_shift = self.ffn(x, self.ln2(x), ffn_shift)
        if hasattr(self, "tiny_ln"):
            xx = self.tiny_ln(x)
            q, k = self.tiny_q(xx), self.tiny_k(xx)  # (B, T, D)
            c = (q @ k.transpose(-2, -1)) * (self.cfg.tiny_att_dim ** -0.5)  # (B, T, T), no softmax
            c = c.masked_fill(_future_mask(T, x.device), 0)
            x = x + c @ self.tiny_v(x_emb)
        return x, att_shift, wkv_state, ffn_shift


def _future_mask(T: int, device) -> torch.Tensor:
    """True above the diagonal: positions a token must not see."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


class RWKV(BlockStack):
    family_name = "rwkv4"  # its record in the registry (src/models), which the rest of the toolkit asks

    def __init__(self, cfg: RWKVConfig, options: Optional[ForwardOptions] = None):
        super().__init__()
        self.cfg = cfg
        self.options = options or ForwardOptions()  # changeable later: every block reads this one object
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, self.options) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.head_qk > 0:
            self.head_q = nn.Linear(cfg.n_embd, cfg.head_qk, bias=False)
            self.head_k = nn.Linear(cfg.n_embd, cfg.head_qk, bias=False)

    # ---------------------------------------------------------------- the pieces

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> x_emb (B, T, C), the first block's input."""
        return self.emb(idx)

    def first_carry(self, x_emb: torch.Tensor) -> tuple:
        """What the blocks pass each other besides x: the embedding, for the block that hosts tiny attention."""
        return (x_emb,) if self.cfg.has_tiny_att else ()

    def run_block(self, i: int, x: torch.Tensor, carry: tuple, layer_state: Optional[tuple]) -> tuple:
        """Block i on x (B, T, C) from its layer's state (None: the start) -> (x, carry, the layer's new state);
        the carry passes unchanged (tiny attention reads the embedding in it)."""
        x_emb = carry[0] if carry else None
        x, *new_layer_state = self.blocks[i](x, x_emb, *(layer_state or (None, None, None)))
        return x, carry, tuple(new_layer_state)

    def check_continues(self, state) -> None:
        if state is not None and self.cfg.windowed_features:
            raise ValueError(f"{', '.join(self.cfg.windowed_features)} attend over the whole window and cannot "
                             f"continue from a state")

    @staticmethod
    def state_of_layers(layers) -> RWKVState:
        """Each block's new layer state, in order -> the model's state (what run_blocks returns)."""
        return RWKVState.from_layers(layers)

    def logits(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last block's output (B, T, C) -> logits (B, T, V); head_qk also reads the token ids idx (B, T)."""
        x = self.ln_out(x)
        logits = self.head(x)
        if self.cfg.head_qk > 0:
            T = x.shape[1]
            q, k = self.head_q(x), self.head_k(x)  # (B, T, H)
            c = (q @ k.transpose(-2, -1)) * (1.0 / self.cfg.head_qk)  # (B, T, T), no softmax
            c = c.masked_fill(_future_mask(T, x.device), 0)
            logits = logits + c @ F.one_hot(idx, self.cfg.vocab_size).to(c.dtype)
        return logits

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, idx: Optional[torch.Tensor] = None,
                  targets_in_sample: Optional[torch.Tensor] = None,
                  positions_in_sample: Optional[int] = None) -> torch.Tensor:
        """The training loss (src/loss.py) of the last block's output x (B, T, C) against targets (B, T), a
        chunk of tokens at a time (head_qk, which mixes all positions, makes the whole logits). The
        normalisers default to this x's; a segment of a longer sample passes the sample's."""
        if self.cfg.head_qk > 0:
            return language_model_loss(self.logits(x, idx), targets, targets_in_sample, positions_in_sample)
        return head_loss(self.ln_out(x), self.head.weight, targets, targets_in_sample, positions_in_sample)

    @torch.no_grad()
    def token_losses(self, x: torch.Tensor, targets: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each target's cross-entropy (B, T), fp32 (fp64 for fp64), 0 where masked, from the last block's output
        x (B, T, C): for held-out evaluation, without autograd and a chunk of tokens at a time (head_qk makes the
        whole logits)."""
        if self.cfg.head_qk > 0:
            logits = self.logits(x, idx)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view_as(targets)
        return head_token_losses(self.ln_out(x), self.head.weight, targets)


# Parameters that keep the values built in the constructor (the v4neo "fancy init").
_KEEP_CONSTRUCTED = ("ln_", ".ln", "time_", "pos_emb")
# Matrices that start at zero, so every block starts close to the identity.
_ZERO_INIT = (".att.key.", ".att.receptance.", ".att.output.", ".ffn.value.", ".ffn.receptance.",
              ".ffnPre.value.", ".ffnPre.receptance.", "head_q.")


@torch.no_grad()
def generate_init_weights(model: RWKV, lr_init: float, device=None, dtype=torch.float32) -> dict:
    """A fresh state dict by the v4neo rules (what the original writes to rwkv-init.pth), on the CPU in `dtype`.

    Norms, time_* and pos_emb keep their constructed values; emb ~ U(-lr_init, lr_init); the listed
    projections are zero; head is orthogonal with gain 0.5*sqrt(V/C), head_k with 0.1, every other
    matrix orthogonal with gain sqrt(rows/cols) when taller than wide, else 1. `device` is where the
    random matrices are made (a GPU makes the orthogonal ones of a 7B model in seconds, not minutes).
    """
    weights = {}
    for name, p in model.state_dict().items():
        if any(tag in name for tag in _KEEP_CONSTRUCTED) or p.dim() < 2:
            weights[name] = p.detach().to(dtype, copy=True)
            continue
        m = torch.empty(p.shape, dtype=torch.float32, device=device)
        if name == "emb.weight":
            nn.init.uniform_(m, a=-lr_init, b=lr_init)
        elif any(tag in name for tag in _ZERO_INIT):
            nn.init.zeros_(m)
        else:
            gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0
            scale = 0.5 if name == "head.weight" else 0.1 if "head_k." in name else 1.0
            nn.init.orthogonal_(m, gain=gain * scale)
        weights[name] = m.to("cpu", dtype)
    return weights

