"""Train or fine-tune an RWKV model (the families of src/models: RWKV-4, RWKV-7). Same flags as the RWKV-LM-LoRA
ChatGal fork's train.py.

    python train.py --help
"""
import contextlib
import dataclasses
import secrets
from pathlib import Path

from src import cli
from src.config import TrainConfig, parse_args
from src.errors import UserInputError


def main(argv=None) -> int:
    """Exit code: 0 when done, 2 for bad input, 130 / 143 after a Ctrl+C / SIGTERM (the state saved when training
    had started; nothing written when it had not)."""
    def body():
        with cli.signals_interrupt():  # until training starts, Ctrl+C / SIGTERM end the run at once
            cfg = parse_args(argv)
            return estimate_memory(cfg) if cfg.estimate_memory else train(cfg)

    return cli.run_main("train.py", body, interrupted="{prog}: {signal} before training started: stopped; nothing "
                                                     "was written")


def estimate_memory(cfg: TrainConfig) -> int:
    """--estimate_memory 1: print the memory the run needs (the memory check's figures; JSON last) and exit 0.
    Before anything touches --proj_dir, a GPU or the data: the model is built on the meta device only. A --load_model
    file that is there decides the family and the widths left to the rule, as in training, and is refused where
    training would refuse it (its keys and shapes only are read, memory-mapped); one not downloaded yet is not
    needed: the flags decide."""
    from src.train import console, memory_check  # console: torch's import-time chatter stays off the output

    with console.library_chatter_silenced():
        read_load_model = bool(cfg.load_model) and Path(cfg.load_model).is_file()
        if read_load_model:
            cfg = with_family_of_load_model(cfg)
            check_load_model_fits(cfg)
        lines = memory_check.estimate(cfg, read_load_model)
    print("\n".join(lines), flush=True)
    return 0


def check_load_model_fits(cfg: TrainConfig) -> None:
    """Refuse a --load_model whose keys and shapes are not those of the model the flags describe (building it on
    the meta device: nothing allocated), as training refuses it."""
    import torch

    family = cfg.family
    with torch.device("meta"):
        model = family.build(family.shape_from_flags(cfg, cfg.vocab_size), family.forward_options(cfg))
    load_model_weights(cfg, model)


def load_model_weights(cfg: TrainConfig, model) -> dict:
    """--load_model's weights (memory-mapped) in the family's layout, refused in one line unless their keys and
    shapes are those of `model` (built from the flags; --load_partial allows missing keys)."""
    from src.io import checkpoint

    family = cfg.family
    weights = family.canonical_weights(checkpoint.load_weights(cfg.load_model))
    checkpoint.check_compatible(model.state_dict(), weights, cfg.load_model, family.shape_flags,
                                allow_missing=bool(cfg.load_partial))
    return weights


def train(cfg: TrainConfig, extra_callbacks=(), write_weights: bool = True) -> int:
    """Run the training `cfg` describes. `extra_callbacks` (Lightning callbacks) watch it, e.g. in benchmarks;
    `write_weights` False trains without writing any .pth (a benchmark never reads them: 15-30 GB for 7B)."""
    # torch and Lightning load here, after the command line is known to be valid
    from src.train import console, stopping

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

    from src.data import dataset, pile_mode
    from src.io import outputs, run_lock
    from src.lora import adapters
    from src.train import callbacks, console, held_out, memory_check, resuming, stopping, strategy, trainer

    outputs.check_writable(cfg.proj_dir)
    pile_changes, pile_resume = pile_mode.pile_continuation(cfg) if cfg.my_pile_stage >= 2 else ({}, "")
    cfg = dataclasses.replace(cfg, **pile_changes)  # the flags of a Pile-stage continuation, as if given
    cfg = with_family_of_load_model(cfg)
    run_flags = resuming.shaping_flags(cfg)  # what a resumed run must share with its bundle
    bundle = resuming.open_bundle(cfg.resume, run_flags) if cfg.resume else None
    if bundle:
        resuming.check_steps_left(bundle, cfg.max_steps, cfg.resume)
    seed = cfg.random_seed if cfg.random_seed >= 0 else secrets.randbits(31)
    pl.seed_everything(seed, verbose=False)
    strategy.set_float_precision(cfg)

    save_dtype = strategy.SAVE_DTYPE[cfg.precision]
    files = outputs.RunFiles.from_flags(cfg)
    # every .pth, rwkv-last.pth of a stop included
    saver = callbacks.WeightSaver(files, cfg.lora_settings, save_dtype, write_weights)
    stopper = stopping.StopOnSignal(stop, saver, Path(cfg.proj_dir) / outputs.BUNDLE_NAME)
    schedule = callbacks.LearningRateSchedule(cfg)
    progress_bar = console.shows_progress_bar(cfg.enable_progress_bar)
    log = callbacks.TrainingLog(cfg, schedule, print_epochs=not progress_bar)
    lightning_trainer = build_lightning_trainer(
        cfg, [stopping.StartOfTraining(stop), schedule, log, saver, stopper, *extra_callbacks], progress_bar)
    if cfg.accumulate_grad_batches_dict:
        lightning_trainer.callbacks.append(callbacks.AccumulationSchedule(cfg))
    rank_zero = lightning_trainer.is_global_zero
    if rank_zero:  # the other ranks start later, in fit, while rank 0 holds the folder
        held_until_the_end.enter_context(run_lock.proj_dir_lock(cfg.proj_dir))
        first_epoch, more_logs = bundle.epoch if bundle else 0, held_out.appended_logs(cfg)  # valid.tsv
        outputs.check_inputs_apart(files, first_epoch, more_logs)
        outputs.check_no_overwrite(files, first_epoch)
        outputs.check_no_folder_in_the_way(files, first_epoch)
        outputs.check_appended_logs(cfg.proj_dir, more_logs)  # train_log.txt, train_steps.tsv and those

    data = dataset.load_token_data(dataset.DataFile.from_flags(cfg))
    dataset.check_against_model(data, cfg, data.vocab_size)
    held_out_windows = held_out.held_out_windows(cfg, data.chars, data.vocab_size) if cfg.valid_data_file else None
    if rank_zero and data.chars is not None:
        dataset.check_char_vocab(data.chars, cfg)
    saver.char_vocab = data.chars
    memory_check.check_run(cfg, data.vocab_size, lightning_trainer)
    model = build_model(cfg, data.vocab_size, save_dtype)
    # wraps the base, freezes the rest
    lora_summary = adapters.prepare_lora_training(model, cfg.lora_settings, cfg.lora_load) if cfg.lora else ""
    if bundle:
        resuming.check_bundle_fits(bundle, model, cfg.resume)
    del bundle

    samples = dataset.TrainingSamples(data, cfg, seed=seed, rank=lightning_trainer.global_rank,
                                      world_size=lightning_trainer.world_size)
    lightning_trainer.callbacks.append(resuming.ResumeGuard(run_flags, cfg.resume, samples))
    if held_out_windows is not None:  # after TrainingLog: its line and W&B step come first
        lightning_trainer.callbacks.append(held_out.Validation(cfg, held_out_windows, log))
    if rank_zero:
        offload_note = ("--strategy offload with --lora: LoRA trains few parameters, so moving their Adam state to "
                        "host memory saves almost no GPU memory; --strategy auto keeps it on the GPU"
                        if cfg.offload and cfg.lora else "")
        for line in (lora_summary, offload_note, pile_resume, data.note):
            if line:
                print(line, flush=True)
        console.print_banner(cfg, data.vocab_size, sum(p.numel() for p in model.parameters()), seed,
                             lightning_trainer.world_size, lightning_trainer.strategy.root_device.type)
    lightning_trainer.fit(trainer.RWKVModule(model, cfg), dataset.build_loader(samples, cfg),
                          ckpt_path=cfg.resume or None)

    stopped = stopper.stopped
    if rank_zero:
        if cfg.resume and not stopped and log.tokens_trained:  # a run that trained nothing keeps what it resumed
            resuming.retire_bundle(cfg.resume)
        saved = saver.saved + ([outputs.BUNDLE_NAME] if stopped else [])
        # valid.tsv only once an evaluation has written it: a run stopped before its first one has none
        logs = [outputs.LOG_NAME, outputs.STEP_LOG_NAME] + [
            name for name, _ in more_logs if (Path(cfg.proj_dir) / name).exists()]
        console.print_summary(cfg.proj_dir, saved, logs, log.tokens_trained, log.seconds, log.last_mean_loss,
                              stopped, log.steady_speed())
    return stopper.exit_code


def with_family_of_load_model(cfg: TrainConfig) -> TrainConfig:
    """--load_model picks the model family from the file's keys; --my_testing picks it for a run from scratch, and
    where both are given they must agree. The shape flags left to the family's rule (0) take the file's values
    (ModelFamily.flags_of_weights: a released RWKV-7's own low-rank widths). A file no family recognises (a LoRA
    file, a damaged one) keeps the flags' family: building the model then says what is wrong with it. A resumed run
    (the same command plus --resume) decides the same way, so that its flags match its bundle's; its weights come from
    the bundle, so a file no longer there is not needed."""
    if not cfg.load_model or (cfg.resume and not Path(cfg.load_model).is_file()):
        return cfg
    from src import models
    from src.io import checkpoint

    weights = checkpoint.load_weights(cfg.load_model)  # memory-mapped: the keys and shapes only are read here
    found = [family for family in models.FAMILIES.values() if family.detect(weights)]
    if checkpoint.is_lora_checkpoint(weights) or len(found) != 1:
        return cfg
    family = found[0]
    if family is not cfg.family:
        if cfg.my_testing:
            raise UserInputError(f"--load_model {cfg.load_model} is an {family.title} model, but --my_testing "
                                 f"{cfg.my_testing} picks {cfg.family.title}; leave --my_testing out to train the "
                                 f"file's family.")
        cfg = dataclasses.replace(cfg, my_testing=family.my_testing).finalize()
    from_file = {name: value for name, value in family.flags_of_weights(weights, f"--load_model {cfg.load_model}")
                 .items() if name in cfg.rule_filled}
    return dataclasses.replace(cfg, **from_file) if from_file else cfg


def build_model(cfg: TrainConfig, vocab_size: int, save_dtype):
    """The model with its starting weights: from --load_model, or a fresh initialisation in the run's dtype (the
    values rwkv-init.pth will hold, written when training starts); a resumed run takes them from its bundle later.
    """
    import torch

    from src.train import strategy

    family = cfg.family
    # loaded weights replace every constructed value (unless --load_partial): build those on the meta device, for free
    replaced_whole = bool(cfg.load_model) and not cfg.load_partial and not cfg.resume
    with torch.device("meta" if replaced_whole else "cpu"):
        model = family.build(family.shape_from_flags(cfg, vocab_size), family.forward_options(cfg))
    if cfg.resume:
        return model
    if cfg.load_model:
        weights = load_model_weights(cfg, model)
        if replaced_whole:
            # parameters in the dtype they train in (src/train/strategy.py parameter_dtype): a file in that dtype is
            # not copied at all (its memory-mapped tensors become the parameters until the strategy moves them to the
            # GPU), so a 7B bf16 model never has an fp32 copy in host memory; another dtype is converted once
            dtype = strategy.parameter_dtype(cfg)
            model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
        else:
            model.load_state_dict(weights, strict=not cfg.load_partial)
        return model
    model.load_state_dict(family.init_weights(model, cfg.lr_init, device=strategy.training_device(cfg),
                                              dtype=save_dtype))
    return model


def build_lightning_trainer(cfg: TrainConfig, callbacks: list, progress_bar: bool):
    """The Trainer, with Lightning's refusals of the hardware flags as one line each."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from src.io import outputs

    from src.train import strategy, trainer

    strategy.check_device_flags(cfg)
    max_epochs = outputs.run_epochs(outputs.RunFiles.from_flags(cfg))
    try:
        return trainer.build_trainer(cfg, callbacks, max_epochs=max_epochs, progress_bar=progress_bar)
    except MisconfigurationException as e:
        raise UserInputError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --strategy {cfg.strategy}: "
                             f"{' '.join(str(e).split())}")


if __name__ == "__main__":
    cli.exit_process(main())
