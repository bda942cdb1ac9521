"""RWKV-7 ("x070", "Goose") as a plain nn.Module whose forward takes and returns the recurrent state.

The computation is BlinkDL's RWKV-v7/train_temp/src/model.py (RWKV_Tmix_x070, RWKV_CMix_x070, Block, RWKV; its plain
PyTorch lines) and the `rwkv` package's RWKV_x070 (RWKV_x070_TMix_seq / CMix_seq), with the WKV-7 recurrence of
src/models/rwkv7/wkv.py. State-dict keys and shapes are those of the released RWKV-x070-*.pth files, so they load
strictly. With C = n_embd, H = C / head_size, N = head_size, F = dim_ffn, V = vocab_size and the low-rank widths
Dw, Da, Dv, Dg:

    emb.weight [V,C]; blocks.0.ln0.{weight,bias} [C]; blocks.i.ln1/ln2.{weight,bias} [C]
    blocks.i.att.x_r/x_w/x_k/x_v/x_a/x_g [1,1,C]
    blocks.i.att.w0 [1,1,C], w1 [C,Dw], w2 [Dw,C]; a0 [1,1,C], a1 [C,Da], a2 [Da,C]
    blocks.i.att.v0 [1,1,C], v1 [C,Dv], v2 [Dv,C]   (not in block 0, which makes v_first)
    blocks.i.att.g1 [C,Dg], g2 [Dg,C]; k_k [1,1,C], k_a [1,1,C], r_k [H,N]
    blocks.i.att.receptance/key/value/output.weight [C,C]; att.ln_x.{weight,bias} [C]
    blocks.i.ffn.x_k [1,1,C], ffn.key.weight [F,C], ffn.value.weight [C,F]
    ln_out.{weight,bias} [C]; head.weight [V,C]

The forward pieces every family's model has (src/models/family.py), which --state_cp's segment engine also drives:
    embed(idx)                             token ids (B, T) -> x (B, T, C)
    first_carry(x)                         () : block 0 makes the carry
    run_block(i, x, carry, layer_state)    block i -> (x, carry, the layer's new state); block 0 returns (v_first,),
                                           its value projection, and the later blocks read it from the carry
    state_of_layers, run_blocks, logits, head_loss, token_losses, forward, loss   as RWKV-4's
Running a sequence in one call, or in segments with the state passed on, gives the same logits.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.loss import head_loss, head_token_losses
from src.models.block_stack import BlockStack
from src.models.rwkv7.config import LN_X_EPS, ForwardOptions, RWKV7Config
from src.models.rwkv7.state import RWKV7State
from src.models.rwkv7.wkv import wkv7


def _layer_ratios(layer_id: int, n_layer: int) -> tuple:
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0  # BlinkDL divides by zero at n_layer 1
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def _channel_ramp(n_embd: int) -> torch.Tensor:
    """ddd[0, 0, i] = i / C, the base of the token-shift mixes' initialisation (computed in double as BlinkDL's
    Python loop does, stored in fp32)."""
    return (torch.arange(n_embd, dtype=torch.float64) / n_embd).reshape(1, 1, n_embd)


def _shifted(x: torch.Tensor, shift: Optional[torch.Tensor]) -> torch.Tensor:
    """The previous token's x for every position: the state's last token (zeros at the start), then x[:, :-1]."""
    first = torch.zeros_like(x[:, :1]) if shift is None else shift.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def last_token(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> its last token (B, C) as a tensor of its own (a view would keep all of x alive)."""
    return x[:, -1].clone()


class TimeMix(nn.Module):
    """RWKV_Tmix_x070: six token-shift mixes, r/k/v projections, the low-rank decay, in-context rate, value residual
    and gate, the WKV-7 recurrence, the ln_x group norm, the r*k*r_k bonus, the gated output."""

    def __init__(self, cfg: RWKV7Config, layer_id: int, options: ForwardOptions):
        super().__init__()
        self.options = options  # the model's, shared: how the WKV-7 operator runs
        self.layer_id = layer_id
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        ratio_0_to_1, ratio_1_to_almost0 = _layer_ratios(layer_id, cfg.n_layer)
        ddd = _channel_ramp(C)

        def mix(power):  # 1 - ddd ** power, BlinkDL's x_* initialisation
            return nn.Parameter((1.0 - ddd ** power).float())

        self.x_r = mix(0.2 * ratio_1_to_almost0)
        self.x_w = mix(0.9 * ratio_1_to_almost0)
        self.x_k = mix(0.7 * ratio_1_to_almost0)
        self.x_v = mix(0.7 * ratio_1_to_almost0)
        self.x_a = mix(0.9 * ratio_1_to_almost0)
        self.x_g = mix(0.2 * ratio_1_to_almost0)

        n = torch.arange(C, dtype=torch.float64)
        linear = n / max(C - 1, 1) - 0.5
        zigzag = ((n % N) - ((N - 1) / 2)) / max((N - 1) / 2, 1e-12)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(C - 1, 1)) ** (1 + 1 * ratio_0_to_1 ** 0.3)

        def row(values):  # (C,) -> a [1, 1, C] parameter
            return nn.Parameter(values.float().reshape(1, 1, C))

        # the low-rank matrices w2/a2/v2/g2 are orthogonal (gain 0.1) in BlinkDL's constructor: init_weights makes
        # them (generate_init_weights), so a model built on the meta device costs nothing here
        # (in BlinkDL's order: w1, w2, w0, a1, a2, a0, v1, v2, v0, g1, g2)
        self.w1 = nn.Parameter(torch.zeros(C, cfg.d_decay_lora))
        self.w2 = nn.Parameter(torch.zeros(cfg.d_decay_lora, C))
        self.w0 = row(www + 0.5 + zigzag * 2.5)
        self.a1 = nn.Parameter(torch.zeros(C, cfg.d_aaa_lora))
        self.a2 = nn.Parameter(torch.zeros(cfg.d_aaa_lora, C))
        self.a0 = row(torch.zeros(C, dtype=torch.float64) - 0.19 + zigzag * 0.3 + linear * 0.4)
        if layer_id > 0:  # block 0's value is v_first itself: released files have no blocks.0.att.v0/v1/v2
            self.v1 = nn.Parameter(torch.zeros(C, cfg.d_mv_lora))
            self.v2 = nn.Parameter(torch.zeros(cfg.d_mv_lora, C))
            self.v0 = row(torch.zeros(C, dtype=torch.float64) + 0.73 - linear * 0.4)
        self.g1 = nn.Parameter(torch.zeros(C, cfg.d_gate_lora))
        self.g2 = nn.Parameter(torch.zeros(cfg.d_gate_lora, C))
        self.k_k = row(torch.zeros(C, dtype=torch.float64) + 0.71 - linear * 0.1)
        self.k_a = row(torch.zeros(C, dtype=torch.float64) + 1.02)
        self.r_k = nn.Parameter(torch.zeros(H, N) - 0.04)

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x, shift, wkv_state, v_first):
        """x (B, T, C) normalised; shift (B, C) or None; wkv_state (B, H, N, N) or None; v_first (B, T, C) or None
        in block 0 -> (out, new shift, new wkv state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _shifted(x, shift) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # soft-clamped inside the WKV-7 operator
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # the value residual
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # the in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        heads = [t.view(B, T, H, N) for t in (r, w, k, v, -kk, kk * a)]
        y, wkv_state = wkv7(*heads, wkv_state, backend=self.options.wkv_backend,
                            part_len=self.options.ctx_part_len)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(dim=-1, keepdim=True) * v.view(B, T, H, N)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), last_token(x), wkv_state, v_first


class ChannelMix(nn.Module):
    """RWKV_CMix_x070: token shift, squared-ReLU key, value; no receptance gate."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        _, ratio_1_to_almost0 = _layer_ratios(layer_id, cfg.n_layer)
        self.x_k = nn.Parameter((1.0 - _channel_ramp(C) ** (ratio_1_to_almost0 ** 4)).float())
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, shift):
        """x (B, T, C) normalised; shift (B, C) or None -> (out, new shift)."""
        k = x + (_shifted(x, shift) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2), last_token(x)


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int, options: ForwardOptions):
        super().__init__()
        self.layer_id = layer_id
        C = cfg.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        if layer_id == 0:  # after ln1 and ln2, as in BlinkDL's Block (the state dict's order)
            self.ln0 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id, options)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift):
        """x (B, T, C) -> (x, v_first, att_shift (B, C), wkv_state (B, H, N, N), ffn_shift (B, C))."""
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, att_shift, wkv_state, v_first = self.att(self.ln1(x), att_shift, wkv_state, v_first)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, att_shift, wkv_state, ffn_shift


class RWKV7Model(BlockStack):
    family_name = "rwkv7"  # its record in the registry (src/models), which the rest of the toolkit asks

    def __init__(self, cfg: RWKV7Config, options: Optional[ForwardOptions] = None):
        super().__init__()
        self.cfg = cfg
        self.options = options or ForwardOptions()  # changeable later: every block reads this one object
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, self.options) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    # ---------------------------------------------------------------- the pieces

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> x (B, T, C), the first block's input (block 0 applies ln0)."""
        return self.emb(idx)

    def first_carry(self, x: torch.Tensor) -> tuple:
        """Nothing passes into block 0: it makes v_first."""
        return ()

    def run_block(self, i: int, x: torch.Tensor, carry: tuple, layer_state: Optional[tuple]) -> tuple:
        """Block i on x (B, T, C) from its layer's state (None: the start) -> (x, (v_first,), the layer's new
        state). Block 0 makes v_first; the later blocks pass the carry on unchanged (the same tensor)."""
        v_first = carry[0] if carry else None
        x, v_first, *new_layer_state = self.blocks[i](x, v_first, *(layer_state or (None, None, None)))
        return x, (v_first,), tuple(new_layer_state)

    @staticmethod
    def state_of_layers(layers) -> RWKV7State:
        """Each block's new layer state, in order -> the model's state (what run_blocks returns)."""
        return RWKV7State.from_layers(layers)

    def logits(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last block's output (B, T, C) -> logits (B, T, V)."""
        return self.head(self.ln_out(x))

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, idx: Optional[torch.Tensor] = None,
                  targets_in_sample: Optional[torch.Tensor] = None,
                  positions_in_sample: Optional[int] = None) -> torch.Tensor:
        """The training loss (src/loss.py: cross-entropy with L2Wrap, as BlinkDL's) of the last block's output x
        (B, T, C) against targets (B, T), a chunk of tokens at a time. The normalisers default to this x's; a
        segment of a longer sample passes the sample's."""
        return head_loss(self.ln_out(x), self.head.weight, targets, targets_in_sample, positions_in_sample)

    @torch.no_grad()
    def token_losses(self, x: torch.Tensor, targets: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each target's cross-entropy (B, T), fp32 (fp64 for fp64), 0 where masked: for held-out evaluation."""
        return head_token_losses(self.ln_out(x), self.head.weight, targets)


# Matrices BlinkDL's generate_init_weight sets to zero, and those it makes orthogonal with gain 0.1.
_ZERO_INIT = (".att.output.", ".ffn.value.")
_SMALL_INIT = (".att.key.",)
# The time-mix's low-rank second halves: orthogonal with gain 0.1 in BlinkDL's RWKV_Tmix_x070 constructor (ortho_init).
_LOW_RANK_OUT = ("w2", "a2", "v2", "g2")


def _ortho_gain(shape) -> float:
    """ortho_init's gain: sqrt(rows / cols) for a tall matrix, else 1."""
    return math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0


@torch.no_grad()
def generate_init_weights(model: "RWKV7Model", device=None, dtype=torch.float32) -> dict:
    """A fresh state dict by BlinkDL's rules (RWKV-v7/train_temp/src/model.py: RWKV_Tmix_x070.__init__,
    RWKV_CMix_x070.__init__ and RWKV.generate_init_weight), on the CPU in `dtype`.

    Tensors without ".weight" in their names keep their constructed values (x_*, w0, a0, v0, k_k, k_a, r_k; w1, a1,
    v1, g1 zero), but w2, a2, v2, g2 are orthogonal with gain 0.1 (x sqrt(rows/cols) when tall); the norms keep
    theirs (weight 1, bias 0) except ln_x.weight = ((1 + layer) / n_layer) ** 0.7; emb ~ U(-1e-4, 1e-4); head is
    orthogonal with gain 0.5 * sqrt(V / C) (0.5 when V <= C); att.output and ffn.value are zero; att.key is
    orthogonal with gain 0.1; every other matrix (receptance, value, ffn.key) orthogonal with gain 1. `device` is
    where the random matrices are made.
    """
    cfg = model.cfg
    weights = {}
    for name, p in model.state_dict().items():
        leaf = name.rpartition(".")[2]
        if name.endswith(".ln_x.weight"):
            layer = int(name.split(".")[1])
            weights[name] = torch.full(p.shape, ((1 + layer) / cfg.n_layer) ** 0.7).to(dtype)
            continue
        if ".att." in name and leaf in _LOW_RANK_OUT:
            m = torch.empty(p.shape, dtype=torch.float32, device=device)
            nn.init.orthogonal_(m, gain=_ortho_gain(p.shape) * 0.1)
            weights[name] = m.to("cpu", dtype)
            continue
        if "ln_" in name or ".ln" in name or ".weight" not in name:
            weights[name] = p.detach().to("cpu", dtype, copy=True)
            continue
        m = torch.empty(p.shape, dtype=torch.float32, device=device)
        if name == "emb.weight":
            nn.init.uniform_(m, a=-1e-4, b=1e-4)
        elif name == "head.weight":
            V, C = p.shape
            nn.init.orthogonal_(m, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        elif any(tag in name for tag in _ZERO_INIT):
            nn.init.zeros_(m)
        elif any(tag in name for tag in _SMALL_INIT):
            nn.init.orthogonal_(m, gain=0.1)
        else:
            nn.init.orthogonal_(m, gain=1.0)
        weights[name] = m.to("cpu", dtype)
    return weights
