"""The segment engine of --state_cp: a micro-batch's training loss with its exact gradient, by backpropagation
through time segment by segment and block by block, with one block's activations over one segment in memory at a
time, whatever the sample's length.

docs/state_cp.md explains the algorithm, why it is exact, its memory and compute, and how each parameter receives
its gradient once per micro-batch (through src/train/state_cp/aliases.py).
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from src.loss import target_count
from src.models import EMBEDDING, HEAD, family_of_model
from src.segments import segment_bounds
from src.train.memory_check import available_host_memory
from src.train.state_cp.aliases import aliases_of, parameters_replaced


def host_memory_for_kept_segments(processes_on_this_host: int) -> int:
    """`keep_bytes` for sample_loss: half the host memory available now, shared by the training processes of
    this machine (0 where the system does not tell)."""
    return (available_host_memory() or 0) // 2 // max(processes_on_this_host, 1)


def sample_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, segment_len: Optional[int] = None,
                keep_bytes: int = 0) -> torch.Tensor:
    """The training loss of a micro-batch (src/loss.py) with its exact gradient.

    idx, targets (B, T). segment_len None: plain backpropagation over the whole sample (model.loss). Otherwise
    the segment-by-segment procedure of docs/state_cp.md; `keep_bytes` is the host memory it may use to
    keep block inputs between its forward and backward passes (0: recompute every segment).
    """
    if segment_len is None:
        return model.loss(idx, targets)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [model.get_parameter(name) for name in names]
    run = _Segments(model, names, segment_bounds(idx.shape[1], segment_len), keep_bytes)
    return _SegmentedLoss.apply(run, idx, targets, *params)


class _Segments:
    """What the Function needs besides tensors: the model, its trainable parameters by piece, the cuts."""

    def __init__(self, model: nn.Module, names: Sequence[str], bounds: List[Tuple[int, int]], keep_bytes: int):
        self.model = model
        self.names = list(names)
        self.bounds = bounds
        self.keep_bytes = keep_bytes
        # the piece of the forward each trainable parameter belongs to: embedding, a block number, or head
        family = family_of_model(model)
        self.piece_of = [family.piece_of(name) for name in self.names]

    def aliases_of(self, aliases: Sequence[torch.Tensor], piece) -> list:
        return [alias for alias, owner in zip(aliases, self.piece_of) if owner == piece]

    def kept_segments(self, idx: torch.Tensor) -> int:
        """How many of the last segments keep their block inputs in `keep_bytes` of host memory: each keeps
        n_blocks + 1 tensors shaped like the embedding of one segment, and each tensor of the carry once (a
        carry passed on unchanged is stored once; one that a block replaces counts for every block, the most it
        can cost)."""
        with torch.no_grad():
            token = self.model.embed(idx[:1, :1])  # (1, 1, C) in the dtype of the block inputs
            carry = self.model.first_carry(token)
        per_token = (self.model.n_blocks + 1) * token.numel() * token.element_size()
        per_token += self.model.n_blocks * sum(c.numel() * c.element_size() for c in carry)
        segment = self.bounds[0][1] - self.bounds[0][0]
        return min(len(self.bounds), self.keep_bytes // (per_token * idx.shape[0] * segment))


class _SegmentedLoss(torch.autograd.Function):
    """loss = sample_loss(model, idx, targets, ...); inputs: the trainable parameters (see docs/state_cp.md)."""

    @staticmethod
    def forward(ctx, run: _Segments, idx, targets, *params):
        n = len(run.bounds)
        kept = run.kept_segments(idx)
        count, positions = target_count(targets), targets.numel()
        states = [None]  # state_i before segment i, in host memory on a GPU
        block_inputs = [None] * n  # ([x_i,0 .. x_i,L], [carry into block 0 .. L-1]) for kept segments
        rng_states = []  # [segment][block]
        loss = 0.0
        state = None
        for i, (start, end) in enumerate(run.bounds):  # autograd is off inside Function.forward
            x, state, rng, inputs = _forward_segment(run.model, idx[:, start:end], state, keep=i >= n - kept)
            rng_states.append(rng)
            block_inputs[i] = inputs
            loss = loss + run.model.head_loss(x, targets[:, start:end], idx[:, start:end], count, positions)
            if i + 1 < n:
                states.append(_to_host(state))
        ctx.run = run
        ctx.autocast = _autocast_state(idx.device)
        ctx.saved = dict(idx=idx, targets=targets, states=states, block_inputs=block_inputs, rng_states=rng_states)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        run, saved = ctx.run, ctx.saved
        model, bounds = run.model, run.bounds
        idx, targets = saved["idx"], saved["targets"]
        device = idx.device
        count, positions = target_count(targets), targets.numel()
        aliases = aliases_of([model.get_parameter(name) for name in run.names])
        sums = _GradientSums(aliases)
        state_grads = None  # dL/d(state_i+1), per layer, from the segment after this one
        with parameters_replaced(model, dict(zip(run.names, aliases))):
            for i in range(len(bounds) - 1, -1, -1):
                start, end = bounds[i]
                segment_idx = idx[:, start:end]
                state = None if saved["states"][i] is None else _to_device(saved["states"][i], device)
                inputs = saved["block_inputs"][i]
                if inputs is None:  # not kept: run the segment again to get its block inputs
                    with _autocast(*ctx.autocast):
                        _, _, _, inputs = _forward_segment(model, segment_idx, state, keep=True,
                                                           replay_rng=saved["rng_states"][i])
                saved["block_inputs"][i] = None  # free the host copies as they are used
                xs, carries = inputs
                grad = _backward_head(model, _to_device(xs[-1], device), targets[:, start:end], segment_idx,
                                      count, positions, grad_output, run.aliases_of(aliases, HEAD), ctx.autocast)
                carry_grad = None  # dL/d(the carry out of the block being differentiated), from the blocks after it
                new_state_grads = [None] * model.n_blocks
                for layer in range(model.n_blocks - 1, -1, -1):
                    grad, carry_grad, new_state_grads[layer] = _backward_block(
                        model, layer, _to_device(xs[layer], device), _to_device(carries[layer], device), state,
                        grad, carry_grad, None if state_grads is None else state_grads[layer],
                        run.aliases_of(aliases, layer), saved["rng_states"][i][layer], ctx.autocast)
                embed_aliases = run.aliases_of(aliases, EMBEDDING)
                if embed_aliases:
                    with torch.enable_grad():
                        x = model.embed(segment_idx)
                        first_carry = model.first_carry(x)
                    outputs, grads = _with_gradients([x, *first_carry], [grad, *(carry_grad or ())])
                    torch.autograd.backward(outputs, grads, inputs=embed_aliases)
                state_grads = new_state_grads
        ctx.saved = None
        return (None, None, None, *sums.take(aliases))


def _layer_state(state, layer: int) -> Optional[tuple]:
    """Layer `layer`'s part of a model state, or None (the start) before the first segment."""
    return None if state is None else state.layer(layer)


def _forward_segment(model: nn.Module, idx: torch.Tensor, state, keep: bool,
                     replay_rng: Optional[list] = None) -> tuple:
    """One segment without a graph: (last block's output, state after it, RNG state before each block,
    the block inputs ([x_0 .. x_L], [carry_0 .. carry_L-1]) in host memory if `keep`, else None).

    The first forward draws from the RNG and records its state before each block; a forward run again
    later passes those states as `replay_rng`, draws the same dropout masks and leaves the RNG untouched.
    A carry tensor that blocks pass on unchanged is copied to the host once.
    """
    rng = [] if replay_rng is None else replay_rng
    with torch.no_grad():
        x = model.embed(idx)
        carry = model.first_carry(x)
        layers, xs, carries, host_copies = [], [], [], {}
        for layer in range(model.n_blocks):
            if keep:
                xs.append(_to_host(x))
                carries.append(tuple(_host_copy_once(c, host_copies) for c in carry))
            if replay_rng is None:
                rng.append(_rng_state(idx.device))
                x, carry, layer_state = model.run_block(layer, x, carry, _layer_state(state, layer))
            else:
                with _restored_rng(replay_rng[layer], idx.device):
                    x, carry, layer_state = model.run_block(layer, x, carry, _layer_state(state, layer))
            layers.append(layer_state)
        if keep:
            xs.append(_to_host(x))
    return x, model.state_of_layers(layers), rng, ((xs, carries) if keep else None)


def _host_copy_once(tensor: torch.Tensor, copies: dict):
    """_to_host(tensor), made once per tensor object: `copies` maps id(tensor) -> (tensor, its host copy), and
    holds the tensor so that its id is not reused while the map lives."""
    if id(tensor) not in copies:
        copies[id(tensor)] = (tensor, _to_host(tensor))
    return copies[id(tensor)][1]


def _backward_head(model, x, targets, idx, count, positions, grad_output, aliases, autocast) -> torch.Tensor:
    """Backpropagate the loss of one segment through the model's head (model.head_loss, which never makes the
    segment's whole logits) into the head's aliases; returns dL/dx (B, S, C)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _autocast(*autocast):
        loss = model.head_loss(x, targets, idx, count, positions)
    torch.autograd.backward([loss], [grad_output], inputs=[x, *aliases])
    return x.grad


def _backward_block(model, layer, x, carry, state, grad, carry_grad, state_grad, aliases, rng, autocast) -> tuple:
    """Recompute one block of one segment from its inputs and differentiate it at once.

    Output gradients: `grad` for the block output, `carry_grad` (or None) for the carry it passes on,
    `state_grad` (or None) for its state outputs.
    Returns (dL/dx, dL/d(its input carry) or None, dL/d(its input state) as a tuple, None for the first segment).
    """
    x = x.detach().requires_grad_(True)
    carry_in = tuple(c.detach().requires_grad_(True) for c in carry)
    state_in = None if state is None else [t.detach().requires_grad_(True) for t in state.layer(layer)]
    with torch.enable_grad(), _autocast(*autocast), _restored_rng(rng, x.device):
        out, carry_out, state_out = model.run_block(layer, x, carry_in, state_in)
    outputs, grads = _with_gradients([out, *carry_out], [grad, *(carry_grad or ())])
    if state_grad is not None:  # a pre_ffn block has no WKV state to train
        more_outputs, more_grads = _with_gradients(state_out, state_grad)
        outputs, grads = outputs + more_outputs, grads + more_grads
    torch.autograd.backward(outputs, grads, inputs=[x, *carry_in, *(state_in or []), *aliases])
    # the state's gradients wait for the previous segment in copies of their own: the shift's gradient is a view of
    # the first row of a (B, S, C) gradient, and views kept for every layer would keep about four such gradients per
    # layer alive (at 7B with segments of 4096, the 4 GiB by which a 131072-token sample's peak on the H200 exceeded
    # one segment's)
    carry_in_grad = tuple(c.grad for c in carry_in) if carry_in else None
    return x.grad, carry_in_grad, (None if state_in is None else
                                   tuple(None if t.grad is None else t.grad.clone() for t in state_in))


def _with_gradients(tensors, gradients) -> tuple:
    """The (outputs, their gradients) pairs that take part in a backward: those whose output depends on what is
    differentiated and whose gradient exists."""
    pairs = [(t, g) for t, g in zip(tensors, gradients) if t.requires_grad and g is not None]
    return [t for t, _ in pairs], [g for _, g in pairs]


class _GradientSums:
    """Sums of the aliases' gradients over the pieces, in fp32 (fp64 for fp64 parameters).

    A post-accumulate hook moves each alias's gradient into its sum as soon as autograd has accumulated it,
    so at no time does a whole set of per-piece gradients exist beside the sums. For an fp32 alias the first
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


# ---------------------------------------------------------------- host copies, RNG and autocast


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream per device for the copies to and from host memory, so they overlap the compute."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


_COPY_STREAMS: dict = {}


def _to_host(value):
    """A tensor or a model state (a named tuple of tensors) kept for later: on a GPU, a pinned host copy made on
    the side stream (the GPU memory is not reused before the copy has read it); on the CPU, the tensors
    themselves."""
    if isinstance(value, tuple):
        return _same_tuple(value, [_to_host(t) for t in value])
    if not value.is_cuda:
        return value
    stream = _copy_stream(value.device)
    stream.wait_stream(torch.cuda.current_stream(value.device))
    with torch.cuda.stream(stream):
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
    value.record_stream(stream)
    return host


def _to_device(value, device: torch.device):
    """The inverse of _to_host; the copy is ordered before any later work on the current stream."""
    if isinstance(value, tuple):
        return _same_tuple(value, [_to_device(t, device) for t in value])
    if device.type != "cuda":
        return value
    stream = _copy_stream(device)
    with torch.cuda.stream(stream):
        on_device = value.to(device, non_blocking=True)
    torch.cuda.current_stream(device).wait_stream(stream)
    on_device.record_stream(torch.cuda.current_stream(device))
    return on_device


def _same_tuple(like: tuple, items: list) -> tuple:
    """`items` as a tuple of the kind of `like`: a model state (a named tuple) or a plain tuple (a carry)."""
    return type(like)(*items) if hasattr(like, "_fields") else tuple(items)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _restored_rng(state: tuple, device: torch.device):
    """Run the block with the RNG at `state`; afterwards the RNG is where it was before the block."""
    cpu_state, cuda_state = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def _autocast_state(device: torch.device) -> tuple:
    """Lightning's mixed precision runs the training step under autocast; the recomputes must too."""
    kind = device.type
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast(kind: str, enabled: bool, dtype: torch.dtype):
    return torch.autocast(kind, dtype=dtype, enabled=enabled)
