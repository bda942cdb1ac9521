"""Exact training on samples of any length (`--state_cp 1`): backpropagation through time, segment by
segment, in the memory of one segment.

The problem. RWKV is recurrent: segment i of a sample maps (tokens_i, state_i) -> (logits_i, state_i+1),
with state_0 empty and a state per layer of (time-mix shift, WKV sums, channel-mix shift) (RWKVState).
Plain backpropagation over T tokens keeps the activations of all T tokens and their [B, T, V] logits,
so memory grows with T. Detaching the state between segments (truncated BPTT, what most peers do)
bounds the memory but drops every gradient that crosses a segment boundary. This module does neither.

The loss is that of one pass over the whole sample (src/loss.py):
    L = sum_i CE_sum(logits_i, targets_i) / N + L2Wrap,   N = unmasked targets of the whole sample,
with L2Wrap's mean over all B*T positions. A sample of T tokens is cut into n = ceil(T / S) segments
of S tokens (S = ctx_len, or ceil(ctx_len / ctx_parts)); the last may be shorter.

Algorithm.
1. Forward, without an autograd graph: run segments 0..n-2, keeping only the boundary states
   state_1..state_n-1 and the RNG state each segment started with (LoRA dropout must draw the same masks
   when the segment is recomputed). The last segment runs with autograd; its graph is kept.
2. Backward, for i = n-1 down to 0: recompute segment i from state_i with autograd (the last one is
   already there), then backpropagate into the parameters and into state_i, feeding its outputs the
   gradients (dL/dloss_i = the incoming gradient, dL/dstate_i+1 = g_i+1 from the pass over segment i+1,
   none for the last). That pass yields g_i = dL/dstate_i for the next one.
Why it is exact: L depends on the parameters through every segment, and on state_i+1 only through
segments i+1..n-1, so by the chain rule dL/dparams = sum_i VJP_i(dL/dloss_i, g_i+1), which is what the
passes accumulate. Each recompute sees the same inputs, parameters and dropout masks as the forward, so
it reproduces the same values; the gradients differ from full backpropagation by rounding only
(tests/test_infctx.py: <= 1e-10 relative in fp64). The WKV state gradient is the true one
(src/wkv.py), so state gradients chain between segments like any other tensor's.

Memory. One segment's activations (what the model keeps for backward; less with --grad_cp) and its
[B, S, V] logits, never the whole sample's; the n-1 boundary states (n_layer * B * (2 C + 3 A) values
each, 2.1 MB for the 7B shape), kept in pinned host memory when training on a GPU so GPU memory does not
depend on T at all; and the gradient sums below. Compute: two forwards and one backward for every
segment but the last, which needs one forward and one backward. A sample that fits in one segment
takes the plain path (one forward, one backward, no overhead).

Gradients reach each parameter once per micro-batch. The passes of step 2 would otherwise deliver one
gradient per segment to every parameter, and DeepSpeed ZeRO-2 reduces a parameter's gradient from a hook
the moment it arrives, asserting it happens once per backward ("Gradient computed twice for this
partition"), which is why the original toolkit's state checkpointing only ran under ZeRO stage 1. Here
the whole procedure is one autograd Function whose inputs are the trainable parameters. Inside it, the
segments run on aliases of those parameters (the same storage under other tensor objects, swapped into
the modules for the duration of a pass), so the per-segment passes accumulate into the aliases and reach
no hook of DDP or DeepSpeed; the Function's backward returns the sums, and the outer backward (Lightning's
or DeepSpeed's own) hands each parameter its gradient once. So ZeRO stage 1 and 2 (with offload) and DDP
all work, and ranks whose samples have different segment counts run no collective inside the Function:
none waits for another. ZeRO-3 is refused: it gathers parameters in module hooks, which aliases bypass.

The design choice: alternatives were (a) one engine backward per segment, which ZeRO-2 refuses and which
would reduce gradients across GPUs once per segment; (b) torch.autograd.grad per segment into a buffer,
which holds a whole segment's gradients beside the buffer (6 bytes per trainable parameter for a 16-bit
model). Here each alias's gradient moves into its fp32 sum as soon as autograd has accumulated it (a
post-accumulate hook), so the cost is the fp32 sums alone: 4 bytes per trainable parameter. With fp32
weights that is no extra memory (the first segment's gradient becomes the sum and then the parameter's
.grad); for LoRA it is negligible; for full fine-tuning of a 16-bit model it is twice the weights (the
original under ZeRO-1 kept a 16-bit gradient, the size of the weights, and summed it in 16 bits; summing
hundreds of segments in bf16 would lose ~sqrt(n) * 2^-9 relative accuracy, which is not exact).
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from src.loss import cross_entropy_sum, language_model_loss, target_count
from src.model import RWKVState


def segment_bounds(length: int, segment_len: Optional[int]) -> List[Tuple[int, int]]:
    """[(start, end), ...] cutting `length` tokens into segments of `segment_len` (the last may be shorter)."""
    if not segment_len or segment_len >= length:
        return [(0, length)]
    return [(start, min(start + segment_len, length)) for start in range(0, length, segment_len)]


def sample_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                segment_len: Optional[int] = None) -> torch.Tensor:
    """The training loss of a micro-batch (src/loss.py), its gradient exact, in the memory of one segment.

    idx, targets (B, T). segment_len None: one pass over the whole sample.
    """
    bounds = segment_bounds(idx.shape[1], segment_len)
    if len(bounds) == 1:
        logits, _ = model(idx)
        return language_model_loss(logits, targets)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [model.get_parameter(name) for name in names]
    return _SegmentedLoss.apply(_Segments(model, names, bounds), idx, targets, *params)


class _Segments:
    """What the Function needs besides tensors: the model, its trainable parameter names, the cuts."""

    def __init__(self, model: nn.Module, names: Sequence[str], bounds: List[Tuple[int, int]]):
        self.model = model
        self.names = list(names)
        self.bounds = bounds


class _SegmentedLoss(torch.autograd.Function):
    """loss = sample_loss(model, idx, targets); inputs: the trainable parameters (see the module docstring)."""

    @staticmethod
    def forward(ctx, segments: _Segments, idx, targets, *params):
        model, bounds = segments.model, segments.bounds
        device = idx.device
        count = target_count(targets)
        positions = targets.numel()
        boundary_states, rng_states = [], []  # state_1..state_n-1 (host memory on a GPU), RNG before segment i
        ce_sum = 0.0
        state = None
        for start, end in bounds[:-1]:  # autograd is off inside Function.forward
            rng_states.append(_rng_state(device))
            logits, state = model(idx[:, start:end], state)
            ce_sum = ce_sum + cross_entropy_sum(logits, targets[:, start:end])
            del logits
            boundary_states.append(_to_host(state))

        aliases = [p.detach().requires_grad_(True) for p in params]
        sums = _GradientSums(aliases)
        start, end = bounds[-1]
        with torch.enable_grad(), _swapped_parameters(model, segments.names, aliases):
            state_in = _requiring_grad(state)
            logits, _ = model(idx[:, start:end], state_in)
            last_loss = language_model_loss(logits, targets[:, start:end], count, positions)
            del logits

        ctx.segments = segments
        ctx.autocast = _autocast_state(device)
        ctx.saved = dict(idx=idx, targets=targets, count=count, positions=positions, aliases=aliases, sums=sums,
                         boundary_states=boundary_states, rng_states=rng_states, last=(last_loss, state_in))
        return ce_sum / count + last_loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        segments, saved = ctx.segments, ctx.saved
        model, bounds = segments.model, segments.bounds
        idx, targets, aliases = saved["idx"], saved["targets"], saved["aliases"]
        device = idx.device
        with _swapped_parameters(model, segments.names, aliases):
            loss, state_in = saved.pop("last")
            state_grad = _backward_segment(loss, None, grad_output, aliases, state_in)
            del loss, state_in
            for i in range(len(bounds) - 2, -1, -1):
                start, end = bounds[i]
                # the recompute runs as the forward did (autocast, dropout masks); its backward, like any, not
                with torch.enable_grad(), _autocast(*ctx.autocast), _restored_rng(saved["rng_states"][i], device):
                    stored = saved["boundary_states"][i - 1] if i > 0 else None
                    state_in = _requiring_grad(None if stored is None else _to_device(stored, device))
                    logits, state_out = model(idx[:, start:end], state_in)
                    loss = language_model_loss(logits, targets[:, start:end], saved["count"], saved["positions"])
                    del logits
                state_grad = _backward_segment(loss, (state_out, state_grad), grad_output, aliases, state_in)
                del loss, state_out, state_in
        grads = saved["sums"].take(aliases)
        ctx.saved = None
        return (None, None, None, *grads)


def _backward_segment(loss, state_out_and_grad, grad_output, aliases, state_in) -> Optional[RWKVState]:
    """Backpropagate one segment into the aliases' gradients; returns dL/d(state_in) (None for segment 0)."""
    outputs, grads = [loss], [grad_output]
    if state_out_and_grad is not None:
        state_out, state_grad = state_out_and_grad
        outputs += [state_out.shift, state_out.wkv]
        grads += [state_grad.shift, state_grad.wkv]
    inputs = list(aliases) + ([] if state_in is None else [state_in.shift, state_in.wkv])
    torch.autograd.backward(outputs, grads, inputs=inputs)
    if state_in is None:
        return None
    return RWKVState(_grad_or_zeros(state_in.shift), _grad_or_zeros(state_in.wkv))


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


class _GradientSums:
    """Sums of the aliases' gradients over the segments, in fp32 (fp64 for fp64 parameters).

    A post-accumulate hook moves each alias's gradient into its sum as soon as autograd has accumulated it,
    so at no time does a whole segment's gradient exist beside the sums. For an fp32 alias the first
    gradient itself becomes the sum (no copy).
    """

    def __init__(self, aliases: Sequence[torch.Tensor]):
        self.sums: List[Optional[torch.Tensor]] = [None] * len(aliases)
        for i, alias in enumerate(aliases):
            alias.register_post_accumulate_grad_hook(self._hook(i))

    def _hook(self, i: int):
        def move_into_sum(alias: torch.Tensor) -> None:
            if self.sums[i] is None:
                self.sums[i] = alias.grad.to(torch.promote_types(alias.dtype, torch.float32))
            else:
                self.sums[i].add_(alias.grad)
            alias.grad = None
        return move_into_sum

    def take(self, aliases: Sequence[torch.Tensor]) -> list:
        """The sums in the parameters' dtypes (zeros for a parameter that got no gradient), releasing each fp32
        sum as it is converted."""
        grads = []
        for i, alias in enumerate(aliases):
            total, self.sums[i] = self.sums[i], None
            grads.append(torch.zeros_like(alias) if total is None else total.to(alias.dtype))
        return grads


@contextlib.contextmanager
def _swapped_parameters(model: nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor]):
    """Within the block, the parameter `names[i]` of `model` is `tensors[i]`; the originals come back after."""
    slots = []
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        slots.append((model.get_submodule(owner_name), leaf))
    originals = [owner._parameters[leaf] for owner, leaf in slots]
    for (owner, leaf), tensor in zip(slots, tensors):
        owner._parameters[leaf] = tensor
    try:
        yield
    finally:
        for (owner, leaf), original in zip(slots, originals):
            owner._parameters[leaf] = original


def _requiring_grad(state: Optional[RWKVState]) -> Optional[RWKVState]:
    """A leaf copy of a boundary state whose gradient the backward pass collects (None: the empty state)."""
    if state is None:
        return None
    return RWKVState(state.shift.detach().requires_grad_(True), state.wkv.detach().requires_grad_(True))


def _to_host(state: RWKVState) -> RWKVState:
    """A boundary state for safe keeping: pinned host memory for GPU tensors (the copy runs on the current
    stream, so it is ordered before anything that reuses the GPU memory), the tensors themselves on the CPU."""
    if not state.shift.is_cuda:
        return state
    return RWKVState(*(_pinned_copy(t) for t in state))


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _to_device(state: RWKVState, device: torch.device) -> RWKVState:
    return RWKVState(*(t.to(device, non_blocking=True) for t in state))


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _restored_rng(state: tuple, device: torch.device):
    """Run the block with the RNG as it was before a segment's forward; the RNG outside is left unchanged."""
    cpu_state, cuda_state = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def _autocast_state(device: torch.device) -> tuple:
    """Lightning's mixed precision runs the training step under autocast; the recompute must too."""
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast(kind: str, enabled: bool, dtype: torch.dtype):
    return torch.autocast(kind, dtype=dtype, enabled=enabled)
