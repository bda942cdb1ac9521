"""What --state_cp 1 cannot run with, checked with the other flags before anything is read (no torch: src/config.py
calls it)."""
from src.errors import UserInputError


def check_state_cp_flags(cfg) -> None:
    """--state_cp carries the state between segments: features that see the whole window at once cannot follow
    (cfg: train.py's flags; reads only --state_cp, --strategy with its ZeRO stage, and the model family's flags that
    its windowed_features names)."""
    if not cfg.state_cp:
        return
    windowed = cfg.family.windowed_features(cfg)
    if windowed:
        raise UserInputError(f"--state_cp 1 cannot train --{windowed[0]}: it attends over the whole window at once, "
                             f"so it cannot continue from the state of an earlier segment; remove one of the two.")
    if cfg.deepspeed and cfg.deepspeed[0] == 3:
        raise UserInputError(f"--state_cp 1 cannot run under --strategy {cfg.strategy} (ZeRO-3 gathers each parameter "
                             f"in module hooks, which the segment passes bypass); use deepspeed_stage_2 or "
                             f"deepspeed_stage_2_offload.")
