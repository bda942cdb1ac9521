"""The training loss: mean next-token cross-entropy over the unmasked targets, plus BlinkDL's L2Wrap.

Targets equal to IGNORE_INDEX (-100) are masked: they add nothing to the loss or its gradient.
The losses take the normaliser explicitly so that a sample trained in segments (src/train/state_cp/engine.py) gets
exactly the loss of the whole sample: each segment divides its summed cross-entropy by the unmasked
targets of the whole sample, and L2Wrap by all of its positions.

Two implementations of one function:
    language_model_loss(logits, targets)   from logits (B, T, V): the reference
    head_loss(x, weight, targets)          = language_model_loss(x @ weight.T, targets), computed a chunk of
                                             tokens at a time, so the [B, T, V] logits never exist
and, for held-out evaluation, head_token_losses(x, weight, targets): each target's cross-entropy (B, T), chunked too.
tests/test_loss.py holds them to each other (loss and every gradient, fp32/fp64/bf16, masks, odd shapes).
"""
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target id that cross_entropy skips

L2WRAP_COEF = 1e-4

# head_loss computes this many logits at a time (2^26: 256 MiB in fp32, plus their 16-bit copy and gradient):
# a few thousand tokens per matrix product at vocabularies of 50k-65k, big enough to run at the matmul rate.
LOGITS_PER_CHUNK = 2 ** 26
# head_loss pads the vocabulary dimension to a multiple of this: cuBLAS runs its fast kernels only when the
# leading dimensions are aligned, and an odd vocabulary (50277) makes the three head products ~5x slower.
VOCAB_ALIGNMENT = 64


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, adds the gradient of 1e-4 * mean(max_logit^2) / 2 to the logits.

    This keeps logits from drifting upward (BlinkDL's L2Wrap). Unlike the original, the extra gradient is
    multiplied by the incoming gradient, so it scales with gradient accumulation and fp16 loss scaling.
    `positions` is the number of (batch, time) positions the mean runs over.
    """

    @staticmethod
    def forward(ctx, loss, logits, positions: int):
        ctx.save_for_backward(logits)
        ctx.positions = positions
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        top, ids = torch.max(logits, dim=-1, keepdim=True)  # (B, T, 1)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, top * (L2WRAP_COEF / ctx.positions))
        return grad_output, glogits * grad_output.to(glogits.dtype), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets != IGNORE_INDEX. logits (B, T, V), targets (B, T).

    Computed in fp32 at least (fp64 logits stay fp64, for gradient checks).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """Number of unmasked targets, at least 1 (a batch whose targets are all masked gives loss 0, not 0/0)."""
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor, targets_in_sample: Optional[torch.Tensor] = None,
                        positions_in_sample: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy with L2Wrap. logits (B, T, V), targets (B, T).

    The mean runs over `targets_in_sample` unmasked targets and L2Wrap over `positions_in_sample`
    positions: by default those of `targets`; a segment of a longer sample passes the whole sample's.
    """
    count: Union[torch.Tensor, int] = target_count(targets) if targets_in_sample is None else targets_in_sample
    positions = targets.numel() if positions_in_sample is None else positions_in_sample
    loss = cross_entropy_sum(logits, targets) / count
    return L2Wrap.apply(loss, logits, positions)


def head_loss_bytes(tokens: int, vocab: int, width: int, dtype_bytes: int, head_trains: bool) -> int:
    """The most head_loss's forward holds at once beyond its inputs, in bytes, for `tokens` tokens: the padded head
    in the compute dtype (16-bit: dtype_bytes), the gradient of x, with a trained head and more than one chunk the
    fp32 sum of the head's gradient, and the largest of: a chunk's logits (the product in the compute dtype and
    its fp32 copy, which becomes their gradient), the logits' gradient in the compute dtype with its product
    with x (the head's gradient from that chunk), and at the end the head's gradient in the compute dtype."""
    padded = math.ceil(vocab / VOCAB_ALIGNMENT) * VOCAB_ALIGNMENT
    chunk_tokens = min(tokens, max(1, LOGITS_PER_CHUNK // padded))
    head = padded * width * dtype_bytes
    sums = padded * width * 4 if head_trains and tokens > chunk_tokens else 0
    logits = chunk_tokens * padded * (4 + dtype_bytes)
    product = chunk_tokens * padded * dtype_bytes + head if head_trains else 0
    return head + tokens * width * dtype_bytes + sums + max(logits, product, head if sums else 0)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's products: autocast's where it is on (as F.linear's would be), else the inputs'."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


def _padded_head(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """weight (V, C) in the compute dtype with zero rows up to a multiple of VOCAB_ALIGNMENT."""
    vocab = weight.shape[0]
    padded = math.ceil(vocab / VOCAB_ALIGNMENT) * VOCAB_ALIGNMENT
    return F.pad(weight.to(compute_dtype), (0, 0, 0, padded - vocab))


def _chunk_logits(x_chunk: torch.Tensor, w: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Logits (n, padded vocabulary) of a chunk of tokens in `dtype`, the padded columns -inf (they take no
    probability, never win a max, and get no gradient)."""
    z = (x_chunk.to(w.dtype) @ w.T).to(dtype)
    z[:, vocab:] = -math.inf
    return z


@torch.no_grad()
def head_token_losses(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      logits_per_chunk: Optional[int] = None) -> torch.Tensor:
    """Each target's cross-entropy (natural log) of the logits x @ weight.T, (B, T) fp32 (fp64 for fp64 inputs),
    0 where the target is masked; no autograd, a chunk of tokens at a time. x (B, T, C), weight (V, C)."""
    compute_dtype = _compute_dtype(x, weight)
    accumulate = torch.promote_types(compute_dtype, torch.float32)
    w = _padded_head(weight, compute_dtype)
    flat_x, flat_targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    losses = torch.zeros(flat_targets.shape, dtype=accumulate, device=x.device)
    step = max(1, (logits_per_chunk or LOGITS_PER_CHUNK) // w.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, flat_x.shape[0], step):
            z = _chunk_logits(flat_x[start:start + step], w, weight.shape[0], accumulate)
            t_chunk = flat_targets[start:start + step]
            unmasked = t_chunk != IGNORE_INDEX
            picked = z.gather(1, t_chunk.clamp(min=0).unsqueeze(1)).squeeze(1)
            losses[start:start + step] = (torch.logsumexp(z, dim=-1) - picked) * unmasked
    return losses.view(targets.shape)


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              targets_in_sample: Optional[torch.Tensor] = None, positions_in_sample: Optional[int] = None,
              logits_per_chunk: Optional[int] = None) -> torch.Tensor:
    """language_model_loss(x @ weight.T, targets, ...) without the [B, T, V] logits. x (B, T, C), weight (V, C).

    Under autocast the products run in the autocast dtype, as F.linear's would; the softmax and the loss in
    fp32 (fp64 for fp64 inputs). The gradients are computed chunk by chunk during the forward (each chunk's
    logits are needed for both) and kept until backward, which scales them by the incoming gradient.
    logits_per_chunk: values computed at once (default LOGITS_PER_CHUNK), counted over the padded vocabulary.
    """
    count = target_count(targets) if targets_in_sample is None else targets_in_sample
    positions = targets.numel() if positions_in_sample is None else positions_in_sample
    compute_dtype = _compute_dtype(x, weight)
    wants_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _HeadLoss.apply(x, weight, targets, count, positions, compute_dtype, logits_per_chunk or LOGITS_PER_CHUNK,
                           wants_grads)


def _chunk_loss(x_chunk, w, vocab, targets, count, positions, accumulate, gradient_dtype) -> tuple:
    """(summed cross-entropy of a chunk of tokens, the gradient of the loss (the sum / count, plus L2Wrap) for its
    logits (n, padded) in gradient_dtype, or None without one). The fp32 logits turn into e^(z - max), then into
    their gradient, in their own memory (torch.logsumexp would make a copy as large), and are freed on return."""
    z = _chunk_logits(x_chunk, w, vocab, accumulate)  # (n, padded)
    unmasked = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0).unsqueeze(1)  # masked targets read column 0, weighted 0
    picked = z.gather(1, safe_targets)  # (n, 1): the targets' logits
    top, top_ids = z.max(dim=-1, keepdim=True)  # (n, 1): for a stable exponential, and L2Wrap's
    exp = z.sub_(top).exp_()  # e^(z - max), in z's memory
    total = exp.sum(dim=-1, keepdim=True)
    lse = top + total.log()  # (n, 1): logsumexp(z)
    ce = ((lse - picked).squeeze(1) * unmasked).sum()
    if gradient_dtype is None:
        return ce, None
    weights = (unmasked.to(accumulate) / count).unsqueeze(1)  # (n, 1)
    grad_z = exp.mul_(weights / total)  # softmax / count
    grad_z.scatter_add_(1, safe_targets, -weights)
    grad_z.scatter_add_(1, top_ids, top * (L2WRAP_COEF / positions))
    return ce, grad_z.to(gradient_dtype)


class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of x @ weight.T over a normaliser, and its gradients, a chunk of tokens at a time.

    Per chunk of n tokens (logits z = x W^T, padded with -inf columns up to the aligned vocabulary):
        loss    += sum over unmasked t of (logsumexp(z_t) - z_t[target_t]) / count
        dL/dz    = (softmax(z_t) - onehot(target_t)) * unmasked_t / count + L2Wrap's max(z_t) * 1e-4 / positions
                   at argmax(z_t) (every position, masked ones included, as L2Wrap)
        dL/dx    = dL/dz W,   dL/dW += (dL/dz)^T x          (the padded rows of W get gradients of 0)
    """

    @staticmethod
    def forward(ctx, x, weight, targets, count, positions, compute_dtype, logits_per_chunk, wants_grads):
        C = x.shape[-1]
        vocab = weight.shape[0]
        accumulate = torch.promote_types(compute_dtype, torch.float32)
        flat_x, flat_targets = x.reshape(-1, C), targets.reshape(-1)
        w = _padded_head(weight, compute_dtype)  # (padded, C)
        padded = w.shape[0]
        want_x = wants_grads and ctx.needs_input_grad[0]
        want_w = wants_grads and ctx.needs_input_grad[1]
        grad_x = torch.empty_like(flat_x) if want_x else None
        grad_w = None  # (padded, C): the one chunk's product, or the fp32 sum of the chunks' products
        ce_sum = torch.zeros((), dtype=accumulate, device=x.device)
        step = max(1, logits_per_chunk // padded)
        with torch.autocast(x.device.type, enabled=False):  # the dtypes above are chosen explicitly
            for start in range(0, flat_x.shape[0], step):
                x_chunk = flat_x[start:start + step].to(compute_dtype)
                ce, grad_z = _chunk_loss(x_chunk, w, vocab, flat_targets[start:start + step], count, positions,
                                         accumulate, compute_dtype if want_x or want_w else None)
                ce_sum += ce
                if grad_z is None:
                    continue
                if want_x:
                    grad_x[start:start + step] = grad_z @ w
                if want_w:
                    partial = grad_z.T @ x_chunk  # (padded, C) in the compute dtype (the product sums in fp32)
                    if grad_w is None:
                        grad_w = partial if step >= flat_x.shape[0] else partial.to(accumulate)
                    else:
                        grad_w += partial  # promoted inside the in-place add: no fp32 copy of `partial`
                    del partial
                del grad_z  # both freed before the next chunk's logits, as head_loss_bytes counts
        ctx.save_for_backward(None if grad_x is None else grad_x.view_as(x),
                              None if grad_w is None else grad_w[:vocab].to(weight.dtype))
        return ce_sum / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_output.to(grad_x.dtype),
                None if grad_w is None else grad_w * grad_output.to(grad_w.dtype), None, None, None, None, None, None)
