"""What a person reads on the console: the banner before training, the summary after it, and silence for the
libraries' own chatter (Lightning's adverts and hardware lines, deprecation warnings meant for their authors).
"""
import contextlib
import logging
import sys
import warnings

from src import accumulation
from src.config import TrainConfig

# Lightning reports through these loggers at INFO level ("GPU available ...", "Tip: ... litlogger",
# "`Trainer.fit` stopped ..."); the banner and the summary say what matters of that.
_LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def library_chatter_silenced():
    """Within the block: Lightning logs warnings and errors only, and warnings that torch and Lightning give
    each other (not the user) are hidden. Both are restored afterwards: train.main may run inside a larger
    program."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        # torch deprecates the LeafSpec class that Lightning's pytree helper still uses
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def shows_progress_bar(enable_progress_bar: int) -> bool:
    """Lightning's bar (--enable_progress_bar) redraws itself with carriage returns: on a terminal only, never into a
    log file."""
    return bool(enable_progress_bar) and sys.stdout.isatty()


def print_banner(cfg: TrainConfig, vocab_size: int, n_params: int, seed: int, world_size: int, device: str) -> None:
    """The run at a glance before training: it shows most of train.py's flags, so it takes them all."""
    batch = cfg.micro_bsz * world_size
    print(f"\n{cfg.family.title} L{cfg.n_layer} D{cfg.n_embd} vocab {vocab_size}: {n_params / 1e6:.2f}M parameters, "
          f"precision {cfg.precision}, strategy {cfg.strategy}, seed {seed}\n"
          f"data {cfg.data_type} {cfg.data_file or ''}; ctx_len {cfg.ctx_len}{_state_cp_note(cfg)}; {world_size} "
          f"{device} device(s) x micro_bsz {cfg.micro_bsz} x accumulate {accumulation.describe(cfg)}\n"
          f"mini-epoch = {cfg.epoch_steps} micro-batches = {cfg.epoch_steps * batch} samples = "
          f"{cfg.epoch_steps * batch * cfg.ctx_len} tokens; epochs {cfg.epoch_begin}..{cfg.epoch_count - 1}; "
          f"lr {cfg.lr_init} -> {cfg.lr_final}, warmup {cfg.warmup_steps} steps; output {cfg.proj_dir}/\n",
          flush=True)


def _state_cp_note(cfg: TrainConfig) -> str:
    if not cfg.state_cp:
        return ""
    segments = -(-cfg.ctx_len // cfg.segment_len)
    return f" in {segments} segment{'s' if segments > 1 else ''} of {cfg.segment_len} tokens (--state_cp)"


def print_summary(proj_dir: str, saved: list, logs: list, tokens: int, seconds: float, mean_loss, stopped: bool,
                  steady_speed=None) -> None:
    """The run's last lines: how it ended, what it trained (and how fast after the first step), what it saved where
    and the logs it appended to."""
    how = "Stopped" if stopped else "Finished"
    loss = f"; last mini-epoch's mean loss {mean_loss:.4f}" if mean_loss is not None else ""
    speed = f", {steady_speed:,.0f} tokens/s after the first optimizer step" if steady_speed else ""
    print(f"\n{how}: trained {tokens:,} tokens in {_duration(seconds)}{speed}{loss}.\n"
          f"Saved in {proj_dir}/: {', '.join(saved) or 'nothing'} (log: {', '.join(logs)})",
          flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{seconds:.1f} s"
