"""Held-out evaluation: a model's loss on windows of token data, overall and by position in the window.

Each window is one sample, inputs x (T,) -> targets y (T,) (IGNORE_INDEX where masked), T <= ctx_len, run
from an empty state (src/eval/windows.py cuts data into windows). The model is driven through its forward
pieces (src/models/rwkv4/model.py), a segment of S tokens at a time:

    x_seg, state = model.run_blocks(model.embed(idx_seg), state)      state: None for the first segment
    losses       = model.token_losses(x_seg, targets_seg, idx_seg)   (B, S): each target's cross-entropy

S = segment_len (--state_cp: ceil(ctx_len / ctx_parts)), or the whole window in one segment. Carrying the
state makes the result that of one pass over the window (up to rounding), and memory is that of one
segment whatever ctx_len is: no autograd graph, and no [B, T, V] logits (token_losses computes the head a
chunk of tokens at a time, src/loss.py).

Sums, never means: each target's loss (natural log) is added, in fp64, to the bucket of its position p in its
window (0 = the target after the first input), buckets [0, 64), [64, 128), [128, 256), ... doubling, the last
ending at ctx_len; masked targets add nothing and are not counted. loss = sum / count over all buckets,
perplexity = exp(loss). Several processes (GPUs) each evaluate a share of the windows (window k on rank
k mod world_size) and add their sums and counts: the same numbers as one process over every window, up to
the order of fp64 additions. A model that uses its context has a loss that falls from bucket to bucket.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from src.data.dataset import pad_batch
from src.loss import IGNORE_INDEX
from src.segments import segment_bounds

FIRST_BUCKET_END = 64  # the first position bucket is [0, 64); each next one is twice as long


def position_edges(ctx_len: int) -> list:
    """Bucket edges [0, 64, 128, 256, ..., ctx_len]: bucket k holds positions edges[k] <= p < edges[k + 1]."""
    edges, end = [0], FIRST_BUCKET_END
    while end < ctx_len:
        edges.append(end)
        end *= 2
    return edges + [ctx_len]


@dataclass
class EvalResult:
    """What one held-out evaluation measured, summed over every window (and every rank)."""
    edges: list  # position buckets, see position_edges
    loss_sums: list  # per bucket: summed cross-entropy of its targets (natural log)
    counts: list  # per bucket: unmasked targets
    windows: int
    input_tokens: int  # tokens run through the model: every window's inputs
    seconds: float

    @property
    def tokens(self) -> int:
        """Targets counted (unmasked)."""
        return sum(self.counts)

    @property
    def loss(self) -> float:
        return sum(self.loss_sums) / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp(710) overflows a float; such a model is broken anyway

    @property
    def loss_by_position(self) -> list:
        """[[start, end, mean loss of the targets at positions start..end-1, or None without any], ...]."""
        return [[start, end, (total / count if count else None)]
                for start, end, total, count in zip(self.edges, self.edges[1:], self.loss_sums, self.counts)]

    @property
    def tokens_per_s(self) -> float:
        """Input tokens per second, all ranks together."""
        return self.input_tokens / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        """The JSON record: loss, perplexity, tokens (targets counted), loss_by_position, and how it ran."""
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "loss_by_position": self.loss_by_position, "windows": self.windows,
                "input_tokens": self.input_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1)}

    def table(self) -> str:
        """The loss by position and in total as aligned text, for a person."""
        lines = [f"{'positions':>20}  {'targets':>12}  {'loss':>8}  {'perplexity':>12}"]
        for (start, end, loss), count in zip(self.loss_by_position, self.counts):
            shown = "-" if loss is None else f"{loss:8.4f}  {math.exp(min(loss, 700.0)):12.3f}"
            lines.append(f"{f'[{start:,}, {end:,})':>20}  {count:>12,}  {shown}")
        lines.append(f"{'all':>20}  {self.tokens:>12,}  {self.loss:8.4f}  {self.perplexity:12.3f}")
        lines.append(f"{self.windows:,} windows, {self.input_tokens:,} tokens in {self.seconds:.1f} s: "
                     f"{self.tokens_per_s:,.0f} tokens/s")
        return "\n".join(lines)


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: Sequence, ctx_len: int, micro_bsz: int,
             segment_len: Optional[int] = None, device="cpu", rank: int = 0, world_size: int = 1,
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> EvalResult:
    """The loss of `model` on `windows` (windows[k] = (x, y), 1-D int64, length <= ctx_len), this rank's share in
    micro-batches of `micro_bsz`, each window cut into segments of `segment_len` (None: whole).

    The model runs in eval mode (no dropout: nothing random is drawn) and goes back to its mode afterwards.
    `reduce` returns the sum of a tensor over all ranks (every rank must call evaluate then). `progress`
    is called after each micro-batch with (this rank's windows done, its windows). The caller chooses the
    precision (autocast) around the call.
    """
    started = time.perf_counter()
    edges = position_edges(ctx_len)
    n_buckets = len(edges) - 1
    # bucket of each position: the number of inner edges at or below it
    bucket_of = torch.bucketize(torch.arange(ctx_len, device=device), torch.tensor(edges[1:-1], device=device),
                                right=True)
    # one fp64 tensor, so that a single all-reduce adds everything: loss sums, counts, windows, input tokens
    # (counts stay exact in fp64 up to 2^53)
    totals = torch.zeros(2 * n_buckets + 2, dtype=torch.float64, device=device)
    sums, counts = totals[:n_buckets], totals[n_buckets:2 * n_buckets]
    mine = range(rank, len(windows), world_size)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(mine), micro_bsz):
            batch = [windows[k] for k in mine[first:first + micro_bsz]]
            x, y = (t.to(device, non_blocking=True) for t in pad_batch(batch))
            _add_window_losses(model, x, y, segment_len, bucket_of, sums, counts)
            totals[-2] += len(batch)
            totals[-1] += sum(len(inputs) for inputs, _ in batch)
            if progress is not None:
                progress(min(first + micro_bsz, len(mine)), len(mine))
    finally:
        model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    values = totals.tolist()  # waits for the device
    return EvalResult(edges=edges, loss_sums=values[:n_buckets], counts=[round(c) for c in values[n_buckets:-2]],
                      windows=round(values[-2]), input_tokens=round(values[-1]), seconds=time.perf_counter() - started)


def _add_window_losses(model, x: torch.Tensor, y: torch.Tensor, segment_len: Optional[int], bucket_of: torch.Tensor,
                       sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the losses of the windows x -> y (B, T) into the per-bucket sums and counts, segment by segment with
    the state carried."""
    state = None
    for start, end in segment_bounds(x.shape[1], segment_len):
        idx, targets = x[:, start:end], y[:, start:end]
        hidden, state = model.run_blocks(model.embed(idx), state)
        losses = model.token_losses(hidden, targets, idx)  # (B, S), 0 where masked
        where = bucket_of[start:end]
        sums.index_add_(0, where, losses.double().sum(0))
        counts.index_add_(0, where, (targets != IGNORE_INDEX).sum(0).double())
