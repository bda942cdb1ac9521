"""Gradient accumulation by mini-epoch: --accumulate_grad_batches K, or a schedule --accumulate_grad_batches_dict.

The one place that knows how many micro-batches make an optimizer step in mini-epoch e, and how many optimizer
steps come before mini-epoch e. The LR schedule, the context warm-up, the step counts of a resumed run and
Lightning's accumulation (src/train/callbacks.py AccumulationSchedule) all take their numbers from here.

Mini-epochs count from the start of the whole training, as in rwkv-<N>.pth and train_log.txt: a run started
with --epoch_begin N is in mini-epoch N during its first Lightning epoch. Lightning steps the optimizer after
every k micro-batches and after the last one of an epoch, so a mini-epoch of epoch_steps micro-batches has
ceil(epoch_steps / k) optimizer steps.
"""
import ast
import functools
import math
from typing import Optional, Protocol

from src.errors import UserInputError


class AccumulationFlags(Protocol):
    """The flags of train.py (src/config.py TrainConfig) these functions read."""
    accumulate_grad_batches: int
    accumulate_grad_batches_dict: Optional[str]
    epoch_steps: int
    epoch_begin: int


def parse_accumulation_schedule(text: str) -> dict:
    """--accumulate_grad_batches_dict '{mini-epoch: k, ...}' -> {int >= 0: int >= 1}."""
    try:
        schedule = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        schedule = None

    def whole(value, least: int) -> bool:
        return type(value) is int and value >= least  # type(): True and False are ints to isinstance

    if not isinstance(schedule, dict) or not schedule or not all(whole(e, 0) and whole(k, 1)
                                                                 for e, k in schedule.items()):
        raise UserInputError(f"--accumulate_grad_batches_dict {text!r} must be a Python dict literal of mini-epoch "
                             f"(>= 0) -> micro-batches per optimizer step (>= 1), e.g. \"{{0: 1, 4: 2}}\".")
    return schedule


@functools.lru_cache(maxsize=8)
def _segments(schedule_text: Optional[str], base: int) -> tuple:
    """((first mini-epoch, k), ...) in order, the first one at mini-epoch 0."""
    schedule = {0: base, **(parse_accumulation_schedule(schedule_text) if schedule_text else {})}
    return tuple(sorted(schedule.items()))


def segments(cfg: AccumulationFlags) -> tuple:
    return _segments(cfg.accumulate_grad_batches_dict, cfg.accumulate_grad_batches)


def accumulation_at(cfg: AccumulationFlags, epoch: int) -> int:
    """Micro-batches per optimizer step in mini-epoch `epoch`."""
    return [k for first, k in segments(cfg) if first <= epoch][-1]


def optimizer_steps_in_epoch(cfg: AccumulationFlags, epoch: int) -> int:
    return math.ceil(cfg.epoch_steps / accumulation_at(cfg, epoch))


def optimizer_steps_before(cfg: AccumulationFlags, epoch: int) -> int:
    """Optimizer steps of mini-epochs 0 .. epoch - 1 (one stretch of equal mini-epochs at a time)."""
    bounds = segments(cfg)
    ends = [first for first, _ in bounds[1:]] + [epoch]
    return sum(max(min(end, epoch) - first, 0) * math.ceil(cfg.epoch_steps / k)
               for (first, k), end in zip(bounds, ends))


def lightning_schedule(cfg: AccumulationFlags) -> dict:
    """{Lightning epoch of this run: k} for Lightning's GradientAccumulationScheduler (its epochs start at 0)."""
    begin = cfg.epoch_begin
    return {0: accumulation_at(cfg, begin), **{first - begin: k for first, k in segments(cfg) if first > begin}}


def describe(cfg: AccumulationFlags) -> str:
    """K, or the schedule as 'k from mini-epoch e' pieces, for the banner."""
    if not cfg.accumulate_grad_batches_dict:
        return str(cfg.accumulate_grad_batches)
    return ", ".join(f"{k} from mini-epoch {first}" for first, k in segments(cfg))
