"""How a sample is cut into segments that run one after the other with the state passed on: --state_cp's
backpropagation through time (src/train/state_cp/) and held-out evaluation (src/eval/engine.py)."""
from typing import List, Optional, Tuple


def segment_bounds(length: int, segment_len: Optional[int]) -> List[Tuple[int, int]]:
    """[(start, end), ...] cutting `length` tokens into segments of `segment_len` (the last may be shorter)."""
    if not segment_len or segment_len >= length:
        return [(0, length)]
    return [(start, min(start + segment_len, length)) for start in range(0, length, segment_len)]
