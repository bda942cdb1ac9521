"""Train or fine-tune an RWKV-4 model. Same flags as the RWKV-LM-LoRA ChatGal fork's train.py.

    python train.py --help
"""
import contextlib
import dataclasses
import secrets
import sys
from pathlib import Path

from src import cli
from src.config import TrainConfig, parse_args
from src.errors import UserInputError


def main(argv=None) -> int:
    """Exit code: 0 when done, 2 for bad input, 130 / 143 after a Ctrl+C / SIGTERM (the state saved when training
    had started; nothing written when it had not)."""
    try:
        with cli.signals_interrupt():  # until training starts, Ctrl+C / SIGTERM end the run at once
            return train(parse_args(argv))
    except UserInputError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except cli.Interrupted as e:
        print(f"train.py: {e} before training started: stopped; nothing was written", file=sys.stderr)
        return 128 + e.signum


def train(cfg: TrainConfig, extra_callbacks=(), write_weights: bool = True) -> int:
    """Run the training `cfg` describes. `extra_callbacks` (Lightning callbacks) watch it, e.g. in benchmarks;
    `write_weights` False trains without writing any .pth (a benchmark never reads them: 15-30 GB for 7B)."""
    from src import console, stopping  # torch and Lightning load here, after the command line is known to be valid

    stop = stopping.StopSignal()
    stop.install()  # Ctrl+C / SIGTERM: at once during start-up; once training runs, after the current step
    try:
        with console.library_chatter_silenced(), contextlib.ExitStack() as held_until_the_end:
            return run_training(cfg, stop, list(extra_callbacks), held_until_the_end, write_weights)
    finally:
        stop.restore()


def run_training(cfg: TrainConfig, stop, extra_callbacks: list, held_until_the_end: contextlib.ExitStack,
                 write_weights: bool = True) -> int:
    """Every check that can refuse the run comes before training starts, and nothing is written into --proj_dir
    before then. `held_until_the_end` keeps the --proj_dir lock until the run has ended, however it ends."""
    import lightning.pytorch as pl

    from src import (callbacks, console, dataset, lora, outputs, pile_mode, resuming, run_lock, stopping, strategy,
                     trainer, validation)
    from src.rwkv4.model import count_parameters

    outputs.check_writable(cfg.proj_dir)
    pile_changes, pile_resume = pile_mode.pile_continuation(cfg) if cfg.my_pile_stage >= 2 else ({}, "")
    cfg = dataclasses.replace(cfg, **pile_changes)  # the flags of a Pile-stage continuation, as if given
    bundle = resuming.open_bundle(cfg) if cfg.resume else None
    seed = cfg.random_seed if cfg.random_seed >= 0 else secrets.randbits(31)
    pl.seed_everything(seed, verbose=False)
    strategy.set_float_precision(cfg)

    save_dtype = strategy.SAVE_DTYPE[cfg.precision]
    saver = callbacks.WeightSaver(cfg, save_dtype, write_weights)  # every .pth, rwkv-last.pth of a stop included
    stopper = stopping.StopOnSignal(stop, saver, Path(cfg.proj_dir) / outputs.BUNDLE_NAME)
    schedule = callbacks.LearningRateSchedule(cfg)
    progress_bar = console.shows_progress_bar(cfg)
    log = callbacks.TrainingLog(cfg, schedule, print_epochs=not progress_bar)
    lightning_trainer = build_lightning_trainer(
        cfg, [stopping.StartOfTraining(stop), schedule, log, saver, stopper, *extra_callbacks], progress_bar)
    if cfg.accumulate_grad_batches_dict:
        lightning_trainer.callbacks.append(callbacks.AccumulationSchedule(cfg))
    rank_zero = lightning_trainer.is_global_zero
    if rank_zero:  # the other ranks start later, in fit, while rank 0 holds the folder
        held_until_the_end.enter_context(run_lock.proj_dir_lock(cfg.proj_dir))
        outputs.check_no_overwrite(cfg, first_epoch=bundle.epoch if bundle else 0)
        outputs.check_no_folder_in_the_way(cfg, first_epoch=bundle.epoch if bundle else 0)

    data = dataset.load_token_data(cfg)
    dataset.check_against_model(data, cfg, data.vocab_size)
    held_out = validation.held_out_windows(cfg, data.chars, data.vocab_size) if cfg.valid_data_file else None
    if rank_zero and data.chars is not None:
        dataset.check_char_vocab(data.chars, cfg)
    saver.char_vocab = data.chars
    check_memory(cfg, data.vocab_size, lightning_trainer)
    model = build_model(cfg, data.vocab_size, save_dtype)
    lora_summary = lora.prepare_lora_training(model, cfg) if cfg.lora else ""  # wraps the base, freezes the rest
    if bundle:
        resuming.check_bundle_fits(bundle, model, cfg)
    del bundle

    samples = dataset.TrainingSamples(data, cfg, seed=seed, rank=lightning_trainer.global_rank,
                                      world_size=lightning_trainer.world_size)
    lightning_trainer.callbacks.append(resuming.ResumeGuard(cfg, samples))
    if held_out is not None:  # after TrainingLog: its line and W&B step come first
        lightning_trainer.callbacks.append(validation.Validation(cfg, held_out, log))
    if rank_zero:
        for line in (lora_summary, pile_resume):
            if line:
                print(line, flush=True)
        console.print_banner(cfg, data.vocab_size, count_parameters(model), seed, lightning_trainer.world_size,
                             lightning_trainer.strategy.root_device.type)
    lightning_trainer.fit(trainer.RWKVModule(model, cfg), dataset.build_loader(samples, cfg),
                          ckpt_path=cfg.resume or None)

    stopped = stopper.exit_code != 0
    if rank_zero:
        if cfg.resume and not stopped:
            resuming.retire_bundle(cfg.resume)
        saved = saver.saved + ([outputs.BUNDLE_NAME] if stopped else [])
        console.print_summary(cfg, saved, log.tokens_trained, log.seconds, log.last_mean_loss, stopped,
                              log.steady_speed())
    return stopper.exit_code


def build_model(cfg: TrainConfig, vocab_size: int, save_dtype):
    """The model with its starting weights: from --load_model, or a fresh initialisation in the run's dtype (the
    values rwkv-init.pth will hold, written when training starts); a resumed run takes them from its bundle later.
    """
    import torch

    from src import checkpoint, strategy
    from src.rwkv4.config import ForwardOptions, RWKVConfig
    from src.rwkv4.model import RWKV, generate_init_weights

    # loaded weights replace every constructed value (unless --load_partial): build those on the meta device, for free
    replaced_whole = bool(cfg.load_model) and not cfg.load_partial and not cfg.resume
    with torch.device("meta" if replaced_whole else "cpu"):
        model = RWKV(RWKVConfig.from_flags(cfg, vocab_size), ForwardOptions.from_flags(cfg))
    if cfg.resume:
        return model
    if cfg.load_model:
        weights = checkpoint.load_weights(cfg.load_model)
        checkpoint.check_compatible(model.state_dict(), weights, cfg.load_model, allow_missing=bool(cfg.load_partial))
        if replaced_whole:
            # parameters in the dtype they train in (src/strategy.py parameter_dtype): a file in that dtype is not
            # copied at all (its memory-mapped tensors become the parameters until the strategy moves them to the
            # GPU), so a 7B bf16 model never has an fp32 copy in host memory; another dtype is converted once
            dtype = strategy.parameter_dtype(cfg)
            model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
        else:
            model.load_state_dict(weights, strict=not cfg.load_partial)
        return model
    model.load_state_dict(generate_init_weights(model, cfg.lr_init, device=strategy.training_device(cfg),
                                                dtype=save_dtype))
    return model


def check_memory(cfg: TrainConfig, vocab_size: int, lightning_trainer) -> None:
    """Refuse a run that this machine's free GPU memory or available host memory cannot hold (src/memory_check.py)."""
    import torch

    from src import memory_check

    device = lightning_trainer.strategy.root_device
    on_gpu = device.type == "cuda"
    need = memory_footprint(cfg, vocab_size, lightning_trainer.world_size, lightning_trainer.num_devices, on_gpu)
    gpu_free = torch.cuda.mem_get_info(device)[0] if on_gpu else None
    memory_check.check_fits(cfg, need, gpu_free, memory_check.available_host_memory())


def memory_footprint(cfg: TrainConfig, vocab_size: int, world_size: int, processes_per_host: int, on_gpu: bool):
    """src/memory_check.py's estimate of this whole run: the state of its parameters, counted on a model built on the
    meta device (no memory, no time), the model's estimate of the activations of a micro-batch at the full ctx_len
    (a --state_cp segment), head_loss's working memory, DeepSpeed's buffers and the processes themselves."""
    import torch

    from src import lora, loss, memory_check
    from src.rwkv4 import anatomy
    from src.rwkv4.config import RWKVConfig
    from src.rwkv4.model import RWKV

    shape = RWKVConfig.from_flags(cfg, vocab_size)
    with torch.device("meta"):
        model = RWKV(shape)
        names = {name for name, _ in model.named_parameters()}
        if cfg.lora_settings:
            lora.apply_lora(model, cfg.lora_settings)
            names = set(lora.trainable_names(model, cfg.lora_settings))
    trained = [p.numel() for n, p in model.named_parameters() if n in names]
    params = sum(p.numel() for p in model.parameters())
    state = memory_check.footprint(cfg, params, sum(trained), world_size, processes_per_host, on_gpu)
    tokens = cfg.segment_len or cfg.ctx_len
    dtype_bytes = 2 if cfg.precision in ("bf16", "fp16") else 4
    activations = (anatomy.activation_bytes(shape, cfg.micro_bsz, tokens, dtype_bytes,
                                            checkpointed=bool(cfg.grad_cp or cfg.state_cp),
                                            inputs_on_device=not cfg.state_cp)
                   + loss.head_loss_bytes(cfg.micro_bsz * tokens, vocab_size, shape.n_embd, dtype_bytes,
                                          head_trains=any(anatomy.piece_of(n) == anatomy.HEAD for n in names)))
    return memory_check.run_footprint(cfg, state, max(trained, default=0), activations, on_gpu, processes_per_host)


def build_lightning_trainer(cfg: TrainConfig, callbacks: list, progress_bar: bool):
    """The Trainer, with Lightning's refusals of the hardware flags as one line each."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from src import outputs, strategy, trainer

    strategy.check_device_flags(cfg)
    try:
        return trainer.build_trainer(cfg, callbacks, max_epochs=outputs.run_epochs(cfg), progress_bar=progress_bar)
    except MisconfigurationException as e:
        raise UserInputError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --strategy {cfg.strategy}: "
                             f"{' '.join(str(e).split())}")


if __name__ == "__main__":
    sys.exit(main())
