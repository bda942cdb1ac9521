"""The layer-spec syntax of --lora_layers and merge_lora_plus.py --layer_filter ("0-3 25-31", "0.5*0-15 1*16-31"),
read and written. Pure Python."""
import math
import re
from typing import Optional

from src.errors import UserInputError

# one token of a layer spec: an optional "coef*", then a layer or an inclusive range "first-last"
_LAYER_TOKEN = re.compile(r"^(?:(?P<coef>[^*]+)\*)?(?P<first>\d+)(?:-(?P<last>\d+))?$")
MAX_LAYERS = 10_000  # layers of the largest model a spec may name when the model is not known yet (7B: 32)


def parse_layer_spec(spec: str, n_layer: Optional[int] = None, what: str = "--lora_layers",
                     coefficients: bool = False) -> dict:
    """"0-3 25-31" -> {0: 1.0, ..., 3: 1.0, 25: 1.0, ...}; with coefficients, "0.5*0-15 1*16-31" -> {0: 0.5, ...}.

    Tokens are separated by spaces or commas; each is an optional `coef*` and a layer or an inclusive
    range a-b. A layer listed twice, a reversed range or a layer >= n_layer is an error.
    """
    tokens = spec.replace(",", " ").split()
    if not tokens:
        raise UserInputError(f"{what} is empty; give layers such as '0-3 25-31'.")
    layers = {}
    for token in tokens:
        match = _LAYER_TOKEN.match(token)
        if not match:
            example = "'0.5*0-15 1*16-31'" if coefficients else "'0-3 25-31'"
            raise UserInputError(f"{what}: cannot read {token!r}; write layers and ranges such as {example}.")
        coef = 1.0
        if match["coef"] is not None:
            if not coefficients:
                raise UserInputError(f"{what} takes layers only ({token!r} has a coefficient; coefficients belong "
                                     f"to merge_lora_plus.py --layer_filter).")
            try:
                coef = float(match["coef"])
            except ValueError:
                coef = math.nan
            if not math.isfinite(coef):
                raise UserInputError(f"{what}: {match['coef']!r} in {token!r} is not a number.")
        first = int(match["first"])
        last = first if match["last"] is None else int(match["last"])
        if last < first:
            raise UserInputError(f"{what}: the range {token!r} runs backwards; write {last}-{first}.")
        if n_layer is not None and last >= n_layer:
            raise UserInputError(f"{what} lists layer {last}, but the model has {n_layer} layers (0-{n_layer - 1}).")
        if last >= MAX_LAYERS:
            raise UserInputError(f"{what} lists layer {last}; no model has {MAX_LAYERS:,} layers.")
        for layer in range(first, last + 1):
            if layer in layers:
                raise UserInputError(f"{what} lists layer {layer} twice.")
            layers[layer] = coef
    return layers


def format_layers(layers) -> str:
    """[0, 1, 2, 5] -> "0-2 5" (the spec syntax, so it can be pasted back into --lora_layers)."""
    ranges = []
    for layer in sorted(layers):
        if ranges and ranges[-1][1] == layer - 1:
            ranges[-1][1] = layer
        else:
            ranges.append([layer, layer])
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
