"""What --valid_data_file and the --valid_* flags go with, checked with the other flags before anything is read (no
torch or Lightning, unlike the evaluation in src/train/held_out.py: src/config.py calls it)."""
from src.errors import UserInputError
from src.data.jsonl import TOKENIZER_HINT
from src.data.script_mask import parse_script_mask
from src.data.types import CHARACTER_DATA_TYPES, WINDOW_DATA_TYPES


def check_held_out_flags(cfg) -> None:
    """--valid_* flags: the held-out data must be readable with the training's masks and numbered like its data
    (cfg: train.py's flags; reads only --valid_data_file, --valid_data_type, --valid_every, --valid_tokens,
    --data_type, --vocab_file, --my_sample_len, --select_name, --my_script_mask and --strategy)."""
    if not cfg.valid_data_file:
        defaults = {"valid_data_type": None, "valid_every": 1, "valid_tokens": 0}
        given = [name for name, default in defaults.items() if getattr(cfg, name) != default]
        if given:
            raise UserInputError(f"--{given[0]} applies to --valid_data_file, the held-out data; add it or remove "
                                 f"--{given[0]}.")
        return
    kind = cfg.valid_data_type or cfg.data_type
    if (kind in CHARACTER_DATA_TYPES) != (cfg.data_type in CHARACTER_DATA_TYPES):
        raise UserInputError(f"--valid_data_type {kind} cannot hold out data for --data_type {cfg.data_type}: "
                             f"character-level text ({', '.join(CHARACTER_DATA_TYPES)}) and token ids mean different "
                             f"things to the model; give held-out data of the training's kind.")
    if kind == "jsonl" and not cfg.vocab_file:
        raise UserInputError(f"--valid_data_type jsonl needs --vocab_file, the tokenizer of the text: "
                             f"{TOKENIZER_HINT}.")
    if kind == "uint16" and cfg.my_sample_len < 2:
        raise UserInputError("--valid_data_type uint16 needs --my_sample_len (the row length, at least 2).")
    if cfg.select_name is not None and kind != "jsonl":
        raise UserInputError(f"--select_name masks jsonl documents; the held-out data (--valid_data_type {kind}) has "
                             f"no speakers to mask: hold out jsonl data too.")
    if cfg.my_script_mask is not None:
        cut, _ = parse_script_mask(cfg.my_script_mask)
        if kind not in WINDOW_DATA_TYPES or (cut and kind != "binidx"):
            raise UserInputError(f"--my_script_mask {cfg.my_script_mask} cannot mask the held-out data "
                                 f"(--valid_data_type {kind}); hold out data of --data_type {cfg.data_type}.")
    if cfg.strategy.startswith("deepspeed_stage_3"):
        raise UserInputError(f"--valid_data_file cannot be evaluated under --strategy {cfg.strategy} (the "
                             f"evaluation reads the head's weight outside the module hooks where ZeRO-3 gathers it); "
                             f"use deepspeed_stage_2, or leave --valid_data_file out and run evaluate.py on the saved "
                             f"files.")
