"""BlinkDL's Pile mode (--my_pile_stage): where its samples come from, its defaults, and how stages 2 and 3
continue a run.

Magic-prime sampling (--my_pile_stage > 0, not 4): the token stream is cut into slots of ctx_len tokens;
sample number s of the run (counted over all ranks) starts at slot (f * (s+1)^3) mod p, with p the magic
prime and f = int(p * (sqrt(5) - 1) / 2). For a prime p = 2 (mod 3), cubing permutes the residues mod p,
so p consecutive samples visit p distinct slots: one pass over the data without repeats.
"""
import math
import re
from pathlib import Path

from src.errors import UserInputError
from src.data.types import WINDOW_DATA_TYPES

# BlinkDL's Pile mode: (magic_prime, my_pile_shift) defaults per ctx_len, and the samples of one mini-epoch.
PILE_DEFAULTS = {1024: (324331313, 0), 2048: (162165671, 512), 4096: (81082817, 768)}
PILE_SAMPLES_PER_EPOCH = 40320
GOLDEN_RATIO_FRACTION = (math.sqrt(5) - 1) / 2  # the original's float, so positions match it exactly
_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # exact for n < 3.3e24


def check_pile_mode_flags(cfg) -> None:
    """The flags of --my_pile_stage sampling and what they need, before anything is read (cfg: train.py's flags;
    reads only --my_pile_stage, --magic_prime, --my_pile_shift, --data_type, --devices, --num_nodes, --micro_bsz,
    --ctx_len, --load_model, --lr_init and --lr_final)."""
    if cfg.my_pile_stage == 0:
        if cfg.magic_prime or cfg.my_pile_shift != -1:
            raise UserInputError("--magic_prime and --my_pile_shift apply to --my_pile_stage sampling only; add "
                                 "--my_pile_stage or remove them.")
        return
    if cfg.data_type not in WINDOW_DATA_TYPES:
        raise UserInputError(f"--my_pile_stage samples windows of {', '.join(WINDOW_DATA_TYPES)} data, not "
                             f"--data_type {cfg.data_type}.")
    if not cfg.devices.isdigit():
        raise UserInputError(f"--my_pile_stage splits {PILE_SAMPLES_PER_EPOCH} samples per mini-epoch over devices x "
                             f"nodes x micro_bsz; pass the number of devices with --devices.")
    real_bsz = int(cfg.devices) * cfg.num_nodes * cfg.micro_bsz
    if PILE_SAMPLES_PER_EPOCH % real_bsz:
        raise UserInputError(f"--my_pile_stage: {PILE_SAMPLES_PER_EPOCH} samples per mini-epoch do not divide into "
                             f"batches of {real_bsz} (devices x nodes x micro_bsz); choose a divisor of "
                             f"{PILE_SAMPLES_PER_EPOCH}.")
    if cfg.my_pile_stage != 4 and not cfg.magic_prime and cfg.ctx_len not in PILE_DEFAULTS:
        raise UserInputError(f"--my_pile_stage {cfg.my_pile_stage} needs --magic_prime for --ctx_len {cfg.ctx_len}: "
                             f"the largest prime p with p % 3 == 2 below tokens / ctx_len.")
    if cfg.my_pile_stage == 1 and cfg.load_model:
        raise UserInputError("--my_pile_stage 1 starts from fresh weights (rwkv-init.pth); remove --load_model, or "
                             "continue with --my_pile_stage 2 or 3.")
    if cfg.my_pile_stage == 2 and cfg.lr_final != cfg.lr_init:
        raise UserInputError(f"--my_pile_stage 2 trains at a constant LR: set --lr_final to --lr_init "
                             f"({cfg.lr_init}).")


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact below 3.3e24, far above any token count)."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def check_magic_prime(prime: int, n_tokens: int, ctx_len: int, shift: int, source: str) -> None:
    """The original's asserts as messages, plus: the last slot (with the shift) must fit in the data."""
    slots = n_tokens // ctx_len
    hint = (f"use the largest prime p with p % 3 == 2 and (p - 1) * ctx_len + my_pile_shift + ctx_len + 1 <= "
            f"{n_tokens} tokens (p near {slots} for {source} at --ctx_len {ctx_len})")
    if not is_prime(prime) or prime % 3 != 2:
        raise UserInputError(f"--magic_prime {prime} is not a prime with p % 3 == 2; {hint}")
    if not 0.99 < prime / max(slots, 1) <= 1:
        raise UserInputError(f"--magic_prime {prime} does not match the data: it must lie within 1% below the "
                             f"{slots} slots of {ctx_len} tokens, or samples miss data; {hint}")
    if (prime - 1) * ctx_len + shift + ctx_len + 1 > n_tokens:
        raise UserInputError(f"--magic_prime {prime} with --my_pile_shift {shift} reads past the end of {source} "
                             f"({n_tokens} tokens); {hint}")


def magic_prime_start(sample_number: int, prime: int, ctx_len: int, shift: int) -> int:
    """First token of sample `sample_number` (0-based over the run and all ranks)."""
    factor = int(prime * GOLDEN_RATIO_FRACTION)
    return (factor * (sample_number + 1) ** 3) % prime * ctx_len + shift


_EPOCH_CHECKPOINT = re.compile(r"rwkv-(\d+)\.pth")


def latest_epoch_checkpoint(proj_dir) -> tuple:
    """(epoch, path) of the newest rwkv-<epoch>.pth in proj_dir, (-1, rwkv-init.pth) when only that exists,
    or (None, None). Other names (rwkv-final.pth, rwkv-last.pth, ...) are not epochs and are ignored."""
    folder = Path(proj_dir)
    epochs = [int(m.group(1)) for p in folder.glob("rwkv-*.pth") if (m := _EPOCH_CHECKPOINT.fullmatch(p.name))]
    if epochs:
        return max(epochs), folder / f"rwkv-{max(epochs)}.pth"
    if (folder / "rwkv-init.pth").is_file():
        return -1, folder / "rwkv-init.pth"
    return None, None


def pile_continuation(cfg) -> tuple:
    """--my_pile_stage >= 2 (cfg: train.py's flags) continues from the newest rwkv-<epoch>.pth in --proj_dir, as
    the original does: that file is loaded, training starts at the next mini-epoch with 10 (stage 2) or 30 LR
    warm-up steps.

    Returns (the flags that change, {name: value}; a line saying so), or ({}, "") when --proj_dir holds no such
    file and the run starts from --load_model or fresh weights.
    """
    epoch, path = latest_epoch_checkpoint(cfg.proj_dir)
    if path is None:
        return {}, ""
    changes = {"load_model": str(path), "epoch_begin": epoch + 1}
    if epoch >= 0:
        changes["warmup_steps"] = 10 if cfg.my_pile_stage == 2 else 30
    if changes["epoch_begin"] >= cfg.epoch_count:
        raise UserInputError(f"--my_pile_stage {cfg.my_pile_stage} continues after {path}, but that is mini-epoch "
                             f"{epoch} and --epoch_count is {cfg.epoch_count}: nothing left to train")
    warmup = changes.get("warmup_steps", cfg.warmup_steps)
    return changes, (f"--my_pile_stage {cfg.my_pile_stage}: continuing from {path} at mini-epoch "
                     f"{changes['epoch_begin']}, LR warm-up {warmup} steps")
