"""DeepSpeed's buckets (src/train/strategy.py size_buckets, src/train/memory_check.py deepspeed_bucket_elements): the
flag's size for a full model, the trainable count under --lora (one bucket on one GPU), the same figure in the
strategy's config and in the memory check. DeepSpeed need not be installed: Lightning's strategy only builds a dict."""
import importlib.util
import logging
import sys
import types
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import deepspeed as lightning_deepspeed

from src.config import parse_args
from src.lora.adapters import prepare_lora_training
from src.train import memory_check
from src.train.memory_check import deepspeed_bucket_elements, deepspeed_gpu_buffers
from src.train.strategy import build_deepspeed_strategy
from src.train.trainer import RWKVModule

VOCAB = 37
SHAPE = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "32", "--vocab_size", str(VOCAB)]


def flags(*extra, strategy="deepspeed_stage_2", precision="bf16"):
    return parse_args([*SHAPE, "--strategy", strategy, "--precision", precision, *extra])


LORA = ("--lora", "--load_model", "base.pth", "--lora_r", "4")


def test_the_flag_sizes_a_full_models_buckets():
    assert deepspeed_bucket_elements(flags(), trainable=7_000_000_000, world_size=1) == 100_000_000  # 200 MB bf16
    assert deepspeed_bucket_elements(flags(precision="fp32"), trainable=10, world_size=4) == 50_000_000
    assert deepspeed_bucket_elements(flags("--ds_bucket_mb", "50"), trainable=10, world_size=1) == 25_000_000


def test_lora_buckets_hold_the_trainable_count():
    cfg = flags(*LORA)
    assert deepspeed_bucket_elements(cfg, trainable=40_000_000, world_size=1) == 40_000_000
    # one GPU: one bucket, even when it is larger than --ds_bucket_mb
    assert deepspeed_bucket_elements(cfg, trainable=300_000_000, world_size=1) == 300_000_000
    # several GPUs: never more than the trainable count, never more than the flag
    assert deepspeed_bucket_elements(cfg, trainable=40_000_000, world_size=4) == 40_000_000
    assert deepspeed_bucket_elements(cfg, trainable=300_000_000, world_size=4) == 100_000_000
    # the memory check counts two such buckets of bf16 gradients, not two of 200 MB
    assert deepspeed_gpu_buffers(cfg, 64, trainable=40_000_000, world_size=1) == 2 * 2 * 40_000_000
    assert deepspeed_gpu_buffers(flags(), 64, trainable=40_000_000, world_size=1) == 2 * 200 * 1000 * 1000


@pytest.fixture
def deepspeed_strategy_builds(monkeypatch):
    """Lightning refuses to build its DeepSpeedStrategy where deepspeed is not installed; its constructor fills the
    config dict this test reads and sets deepspeed's log level, which a stand-in module takes."""
    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_GREATER_EQUAL_0_16", True)
    if importlib.util.find_spec("deepspeed") is None:
        stand_in = types.SimpleNamespace(utils=types.SimpleNamespace(logging=types.SimpleNamespace(
            logger=logging.getLogger("deepspeed stand-in"))))
        monkeypatch.setitem(sys.modules, "deepspeed", stand_in)


@pytest.mark.parametrize("lora, world_size", [(True, 1), (True, 2), (False, 1)])
def test_the_strategys_config_gets_the_buckets_the_memory_check_counts(deepspeed_strategy_builds, monkeypatch, lora,
                                                                       world_size):
    """The module's setup hook (before the strategy builds DeepSpeed's engine) sizes the buckets from the parameters
    that train; the memory check, counting on a model of its own, comes to the same figure."""
    cfg = flags(*LORA) if lora else flags()
    family = cfg.family
    model = family.build(family.shape_from_flags(cfg, VOCAB))
    if lora:
        prepare_lora_training(model, cfg.lora_settings, cfg.lora_load)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    strategy = build_deepspeed_strategy(cfg)
    module = RWKVModule(model, cfg)
    module.trainer = SimpleNamespace(strategy=strategy, world_size=world_size)
    module.setup("fit")
    zero = strategy.config["zero_optimization"]
    expected = trainable if lora else 100_000_000
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == expected

    counts = memory_check.count_parameters(cfg, VOCAB)
    assert counts.trainable == trainable
    counted = []
    real = memory_check.deepspeed_gpu_buffers
    monkeypatch.setattr(memory_check, "deepspeed_gpu_buffers", lambda *args: counted.append(real(*args)) or counted[-1])
    memory_check.run_need(cfg, VOCAB, world_size=world_size, processes_per_host=world_size, on_gpu=True)
    assert counted == [2 * expected * 2]  # two buckets of bf16 gradients
