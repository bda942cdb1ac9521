"""The training step's pieces: L2Wrap's gradient, the layer-wise LR scales, the weight-decay groups."""
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from src.config import parse_args
from src.loss import L2WRAP_COEF, language_model_loss
from src.train.trainer import build_param_groups


def test_l2wrap_adds_the_gradient_of_its_penalty_scaled_by_the_incoming_gradient():
    """L2Wrap = the gradient of 1e-4 * mean over positions of max_logit^2 / 2, without changing the loss value."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -100
    loss = language_model_loss(logits, targets)
    (3.0 * loss).backward()  # an incoming gradient other than 1 (accumulation, loss scaling)
    got = logits.grad.clone()

    logits.grad = None
    mean_ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    penalty = L2WRAP_COEF * (logits.max(dim=-1).values ** 2).mean() / 2
    (3.0 * (mean_ce + penalty)).backward()
    assert torch.allclose(loss, mean_ce)
    assert torch.allclose(got, logits.grad, rtol=1e-12, atol=1e-15)


def group_of(groups, name):
    (group,) = [g for g in groups if name in g["names"]]
    return group


@pytest.mark.parametrize("pile_stage, scales", [
    (0, {"time_decay": 2.0, "time_first": 3.0, "time_mix_k": 1.0, "key.weight": 1.0}),
    (2, {"time_decay": 5.0, "time_first": 5.0, "time_mix_k": 5.0, "key.weight": 1.0}),
])
def test_layerwise_lr_scales(pile_stage, scales):
    flags = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "16"]
    if pile_stage:
        flags += ["--my_pile_stage", "2", "--devices", "1", "--micro_bsz", "8", "--ctx_len", "1024",
                  "--lr_final", "6e-4"]
    groups = build_param_groups(tiny_model(), parse_args(flags))
    for leaf, scale in scales.items():
        assert group_of(groups, f"blocks.1.att.{leaf}")["lr_scale"] == scale, leaf
    assert group_of(groups, "emb.weight")["lr_scale"] == 1.0
    flat = build_param_groups(tiny_model(), parse_args([*flags, "--layerwise_lr", "0"]))
    assert {g["lr_scale"] for g in flat} == {1.0}


def test_weight_decay_reaches_matrices_only():
    model = tiny_model()
    groups = build_param_groups(model, parse_args(["--data_type", "dummy", "--weight_decay", "0.1"]))
    decayed = {n for g in groups if g["weight_decay"] == 0.1 for n in g["names"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2}  # emb, projections, head
    assert "blocks.0.att.time_mix_k" not in decayed and "blocks.0.ln1.weight" not in decayed  # [1, 1, C], norms
    assert {g["weight_decay"] for g in build_param_groups(model, parse_args(["--data_type", "dummy"]))} == {0.0}


def test_frozen_parameters_are_left_out_and_groups_can_be_bounded():
    model = tiny_model()
    model.emb.weight.requires_grad_(False)
    cfg = parse_args(["--data_type", "dummy"])
    whole = build_param_groups(model, cfg)
    assert all("emb.weight" not in g["names"] for g in whole)
    bounded = build_param_groups(model, cfg, max_group_numel=1000)
    assert all(sum(p.numel() for p in g["params"]) <= 1000 or len(g["params"]) == 1 for g in bounded)
    assert len(bounded) > len(whole)
    # the same parameters in the same order, with the same settings
    assert [n for g in bounded for n in g["names"]] == [n for g in whole for n in g["names"]]
    settings = {n: (g["lr_scale"], g["weight_decay"]) for g in whole for n in g["names"]}
    assert all(settings[n] == (g["lr_scale"], g["weight_decay"]) for g in bounded for n in g["names"])
