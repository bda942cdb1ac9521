"""Train or fine-tune an RWKV-4 model. Same flags as the RWKV-LM-LoRA ChatGal fork's train.py.

    python train.py --help
"""
import secrets
import sys
from pathlib import Path

from src import accumulation
from src.config import TrainConfig, UserInputError, parse_args


def main(argv=None) -> int:
    """Exit code: 0 when done, 2 for bad input, 130 / 143 after a Ctrl+C / SIGTERM stop (state saved)."""
    try:
        cfg = parse_args(argv)
        return train(cfg)
    except UserInputError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2


def train(cfg: TrainConfig, extra_callbacks=()) -> int:
    """Run the training `cfg` describes. `extra_callbacks` (Lightning callbacks) watch it, e.g. in benchmarks."""
    from src import stopping

    stop = stopping.StopSignal()
    stop.install()  # from here on, Ctrl+C / SIGTERM finish the current step and save
    try:
        return run_training(cfg, stop, list(extra_callbacks))
    finally:
        stop.restore()


def run_training(cfg: TrainConfig, stop, extra_callbacks: list) -> int:
    # torch and Lightning load here, after the command line is known to be valid
    import lightning.pytorch as pl
    import torch

    from src import callbacks, checkpoint, dataset, lora, sampling, stopping, trainer
    from src.model import RWKV, RWKVConfig, count_parameters, generate_init_weights

    if cfg.resume:
        stopping.check_bundle(cfg.resume)
    Path(cfg.proj_dir).mkdir(parents=True, exist_ok=True)
    pile_resume = sampling.continue_pile_run(cfg) if cfg.my_pile_stage >= 2 else ""
    seed = cfg.random_seed if cfg.random_seed >= 0 else secrets.randbits(31)
    pl.seed_everything(seed, verbose=False)
    trainer.set_float_precision(cfg)

    data = dataset.load_token_data(cfg)
    model_cfg = RWKVConfig(
        vocab_size=data.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, dim_att=cfg.dim_att,
        dim_ffn=cfg.dim_ffn, pre_ffn=cfg.pre_ffn, head_qk=cfg.head_qk, tiny_att_dim=cfg.tiny_att_dim,
        tiny_att_layer=cfg.tiny_att_layer, my_pos_emb=cfg.my_pos_emb, grad_cp=bool(cfg.grad_cp),
        wkv_backend=cfg.wkv_backend, wkv_chunk_len=cfg.chunk_len)
    dataset.check_against_model(data, cfg, model_cfg.vocab_size)
    # loaded weights replace every constructed value (unless --load_partial): build those on the meta device, for free
    replaced_whole = bool(cfg.load_model) and not cfg.load_partial and not cfg.resume
    with torch.device("meta" if replaced_whole else "cpu"):
        model = RWKV(model_cfg)
    save_dtype = trainer.SAVE_DTYPE[cfg.precision]
    if cfg.resume:
        weights = None  # everything comes from the bundle
    elif cfg.load_model:
        weights = checkpoint.load_weights(cfg.load_model)
        checkpoint.check_compatible(model.state_dict(), weights, cfg.load_model, allow_missing=bool(cfg.load_partial))
    else:
        # a fresh model is written to rwkv-init.pth (in the run's dtype) and trained from that file's values
        device = "cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu"
        weights = generate_init_weights(model, cfg.lr_init, device=device, dtype=save_dtype)

    schedule = callbacks.LearningRateSchedule(cfg)
    run_epochs = cfg.epoch_count - cfg.epoch_begin
    if cfg.max_epochs is not None:
        run_epochs = min(run_epochs, cfg.max_epochs)
    # what the .pth files hold: the whole model, or in LoRA runs only the tensors LoRA trains (+ settings)
    weights_of = lora.lora_weights_of(cfg, trainer.full_state_dict) if cfg.lora else trainer.full_state_dict
    saver = callbacks.WeightSaver(cfg, save_dtype, weights_of)
    stopper = stopping.StopOnSignal(stop, lambda t, m: saver.save(t, m, "rwkv-last.pth"),
                                    Path(cfg.proj_dir) / stopping.BUNDLE_NAME)
    lightning_trainer = trainer.build_trainer(cfg, [schedule, callbacks.TrainingLog(cfg, schedule), saver, stopper,
                                                    *extra_callbacks], max_epochs=run_epochs)
    if cfg.accumulate_grad_batches_dict:
        lightning_trainer.callbacks.append(callbacks.AccumulationSchedule(cfg))

    if weights is not None:
        if not cfg.load_model and lightning_trainer.is_global_zero:
            checkpoint.save_weights(weights, Path(cfg.proj_dir) / "rwkv-init.pth")
        if replaced_whole:  # fp32 parameters as constructed ones would be, never sharing the file's mapped memory
            model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in weights.items()}, assign=True)
        else:
            model.load_state_dict(weights, strict=not cfg.load_partial)
        del weights
    if cfg.lora:  # LoRA wraps the loaded base weights, restores --lora_load and freezes the rest
        lora_summary = lora.prepare_lora_training(model, cfg)
        if lightning_trainer.is_global_zero:
            print(lora_summary, flush=True)

    samples = dataset.TrainingSamples(data, cfg, seed=seed, rank=lightning_trainer.global_rank,
                                      world_size=lightning_trainer.world_size)
    loader = dataset.build_loader(samples, cfg)
    lightning_trainer.callbacks.append(stopping.ResumeGuard(cfg, samples))
    if lightning_trainer.is_global_zero:
        if pile_resume:
            print(pile_resume, flush=True)
        print_banner(cfg, model_cfg, count_parameters(model), seed, lightning_trainer.world_size)
    lightning_trainer.fit(trainer.RWKVModule(model, cfg), loader, ckpt_path=cfg.resume or None)
    return stopper.exit_code


def print_banner(cfg: TrainConfig, model_cfg, n_params: int, seed: int, world_size: int) -> None:
    batch = cfg.micro_bsz * world_size
    print(f"\nRWKV-4 L{cfg.n_layer} D{cfg.n_embd} vocab {model_cfg.vocab_size}: {n_params / 1e6:.2f}M parameters, "
          f"precision {cfg.precision}, strategy {cfg.strategy}, seed {seed}\n"
          f"data {cfg.data_type} {cfg.data_file or ''}; ctx_len {cfg.ctx_len}{state_cp_note(cfg)}; {world_size} "
          f"device(s) x micro_bsz {cfg.micro_bsz} x accumulate {accumulation.describe(cfg)}\n"
          f"mini-epoch = {cfg.epoch_steps} micro-batches = {cfg.epoch_steps * batch} samples = "
          f"{cfg.epoch_steps * batch * cfg.ctx_len} tokens; epochs {cfg.epoch_begin}..{cfg.epoch_count - 1}; "
          f"lr {cfg.lr_init} -> {cfg.lr_final}, warmup {cfg.warmup_steps} steps; output {cfg.proj_dir}/\n",
          flush=True)


def state_cp_note(cfg: TrainConfig) -> str:
    if not cfg.state_cp:
        return ""
    segments = -(-cfg.ctx_len // cfg.segment_len)
    return f" in {segments} segment{'s' if segments > 1 else ''} of {cfg.segment_len} tokens (--state_cp)"


if __name__ == "__main__":
    sys.exit(main())
