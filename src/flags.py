"""Flags as data: a dataclass field that is also a command-line flag (`flag`), and the numeric ranges flags declare
(`Range`). train.py's flags (src/config.py) and each model family's flag group (src/models/<family>/flags.py) are
written with them. Pure Python."""
import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: finite numbers from `low` up to `high` (None: no upper bound; an open
    end excludes the bound itself), and the `sentinels` its help documents (-1 = auto, ...)."""
    low: float
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    sentinels: tuple = ()

    def admits(self, value) -> bool:
        if value in self.sentinels:
            return True
        if not math.isfinite(value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above_low and below_high

    def describe(self) -> str:
        """"at least 1", "above 0", "in [0, 1)", "at least 1, or -1"."""
        if self.high is None:
            text = f"{'above' if self.low_open else 'at least'} {self.low}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return text + "".join(f", or {sentinel}" for sentinel in self.sentinels)


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
ABOVE_0 = Range(0, low_open=True)
# a count a run indexes or loops over (samples, steps, tokens of a window): an int32, as numpy's and the kernels' indexes
COUNT = Range(1, 2 ** 31 - 1)
# a model width: far beyond any model's (7B: 4096), so that the sizes of its matrices stay countable
MAX_WIDTH = 2 ** 24
MAX_LAYERS = 10_000  # the most layers of any model (7B: 32)


def flag(default, group: str, help: str, valid: Optional[Range] = None, **argparse_kwargs):
    """A dataclass field that is also a command-line flag `--<field name>`. Numeric flags declare the values
    they accept in `valid` (validate() refuses the others: NaN, infinities, out of range); flags with a few
    values list them in argparse's `choices`."""
    return field(default=default, metadata={"group": group, "help": help, "valid": valid, **argparse_kwargs})
