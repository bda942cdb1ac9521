"""RWKV-4 model: v4neo keys and shapes, init rules, state chaining, activation checkpointing."""
import math

import pytest
import torch

from helpers import tiny_model
from src.models.rwkv4.config import RWKVConfig
from src.models.rwkv4.model import RWKV, generate_init_weights
from src.models.rwkv4.state import initial_state


def test_golden_keys_and_shapes():
    C, A, F, V = 8, 12, 20, 11
    model = RWKV(RWKVConfig(vocab_size=V, n_layer=2, n_embd=C, dim_att=A, dim_ffn=F))
    expected = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
                "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(2):
        b = f"blocks.{i}."
        expected.update({
            b + "ln1.weight": (C,), b + "ln1.bias": (C,), b + "ln2.weight": (C,), b + "ln2.bias": (C,),
            b + "att.time_decay": (A,), b + "att.time_first": (A,),
            b + "att.time_mix_k": (1, 1, C), b + "att.time_mix_v": (1, 1, C), b + "att.time_mix_r": (1, 1, C),
            b + "att.key.weight": (A, C), b + "att.value.weight": (A, C), b + "att.receptance.weight": (A, C),
            b + "att.output.weight": (C, A),
            b + "ffn.time_mix_k": (1, 1, C), b + "ffn.time_mix_r": (1, 1, C),
            b + "ffn.key.weight": (F, C), b + "ffn.receptance.weight": (C, C), b + "ffn.value.weight": (C, F),
        })
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_optional_parts_keys_and_no_buffers():
    model = RWKV(RWKVConfig(vocab_size=11, n_layer=3, n_embd=8, pre_ffn=1, head_qk=4, tiny_att_dim=6,
                            tiny_att_layer=2, my_pos_emb=3))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert not any(k.startswith("blocks.0.att.") for k in shapes)
    assert shapes["blocks.0.ffnPre.key.weight"] == (32, 8)
    assert shapes["head_q.weight"] == (4, 8) and shapes["head_k.weight"] == (4, 8)
    assert shapes["blocks.2.tiny_q.weight"] == (6, 8) and shapes["blocks.2.tiny_v.weight"] == (8, 8)
    assert shapes["blocks.2.tiny_ln.weight"] == (8,)
    assert shapes["blocks.0.pos_emb_x"] == (1, 3, 8) and shapes["blocks.0.pos_emb_y"] == (3, 1, 8)
    assert not any("mask" in k for k in shapes)  # the original saved ctx_len^2 buffers
    logits, _ = model(torch.randint(0, 11, (2, 7)))
    assert logits.shape == (2, 7, 11) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="cannot continue from a state"):
        model(torch.randint(0, 11, (2, 7)), initial_state(model.cfg, 2))


def test_time_parameter_init_rules():
    n_layer, C = 4, 10
    model = RWKV(RWKVConfig(vocab_size=5, n_layer=n_layer, n_embd=C))
    for layer in (0, 3):
        att, ffn = model.blocks[layer].att, model.blocks[layer].ffn
        r01, r10 = layer / (n_layer - 1), 1 - layer / n_layer
        h = torch.arange(C, dtype=torch.float32)
        torch.testing.assert_close(att.time_decay.data, -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01))
        assert att.time_decay[0].item() == pytest.approx(-5) and att.time_decay[-1].item() == pytest.approx(3)
        zigzag = torch.tensor([0.0, 0.5, -0.5] * 4)[:C]
        torch.testing.assert_close(att.time_first.data, math.log(0.3) + zigzag)
        ddd = (h / C).reshape(1, 1, C)
        torch.testing.assert_close(att.time_mix_k.data, ddd ** r10)
        torch.testing.assert_close(att.time_mix_v.data, ddd ** r10 + 0.3 * r01)
        torch.testing.assert_close(att.time_mix_r.data, ddd ** (0.5 * r10))
        torch.testing.assert_close(ffn.time_mix_k.data, ddd ** r10)
        torch.testing.assert_close(ffn.time_mix_r.data, ddd ** r10)


def test_single_layer_model_builds():
    """The original divided by n_layer - 1."""
    model = RWKV(RWKVConfig(vocab_size=5, n_layer=1, n_embd=4))
    assert torch.isfinite(model.blocks[0].att.time_decay).all()


def test_generate_init_weights_rules():
    lr_init = 1e-3
    model = RWKV(RWKVConfig(vocab_size=50, n_layer=2, n_embd=8, head_qk=4))
    w = generate_init_weights(model, lr_init)
    assert set(w) == set(model.state_dict())
    emb = w["emb.weight"]
    assert emb.abs().max() <= lr_init and emb.std() > lr_init / 3  # U(-lr_init, lr_init)
    for name in ("blocks.1.att.key.weight", "blocks.1.att.receptance.weight", "blocks.1.att.output.weight",
                 "blocks.1.ffn.value.weight", "blocks.1.ffn.receptance.weight", "head_q.weight"):
        assert (w[name] == 0).all(), name

    def assert_orthogonal(name, gain):
        """All singular values equal the gain (up to fp32 rounding)."""
        values = torch.linalg.svdvals(w[name].double())
        torch.testing.assert_close(values, torch.full_like(values, gain), rtol=1e-5, atol=0, msg=name)

    assert_orthogonal("blocks.0.att.value.weight", 1.0)
    assert_orthogonal("blocks.0.ffn.key.weight", 2.0)  # sqrt(32 / 8)
    assert_orthogonal("head.weight", 0.5 * math.sqrt(50 / 8))
    assert_orthogonal("head_k.weight", 0.1)
    for name in ("blocks.0.att.time_decay", "blocks.1.ffn.time_mix_k", "blocks.0.ln0.weight"):
        assert torch.equal(w[name], model.state_dict()[name]), name


def _loss_and_grads(model, idx, split=None):
    model.zero_grad()
    if split is None:
        logits, state = model(idx)
    else:
        parts = []
        state = None
        for a, b in zip([0] + split, split + [idx.shape[1]]):
            out, state = model(idx[:, a:b], state)
            parts.append(out)
        logits = torch.cat(parts, 1)
    g = torch.Generator().manual_seed(7)
    loss = (logits * torch.randn(logits.shape, generator=g)).sum() + state.wkv[..., :2].sum() * 1e-3
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("split", [[5], [1, 2, 9]])
def test_model_chaining_equals_one_call(split):
    model = tiny_model(n_layer=3, dim_ffn=24).double()
    idx = torch.randint(0, 37, (2, 12))
    logits_a, grads_a = _loss_and_grads(model, idx)
    logits_b, grads_b = _loss_and_grads(model, idx, split)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-10, atol=1e-10)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("pre_ffn", [0, 1])
def test_layer_states_hold_no_activations(pre_ffn):
    """Each tensor of a layer's state owns only its own values. A view of the last token would keep the block's
    whole (B, T, C) activation alive for as long as the state lives; the --state_cp forward holds every layer's
    state until its last block (2 GiB at 7B and 4096 tokens, found in a memory profile on the H200)."""
    model = tiny_model(n_layer=2, dim_ffn=24, pre_ffn=pre_ffn)
    x = model.embed(torch.randint(0, 37, (2, 12)))
    for layer in range(model.n_blocks):
        with torch.no_grad():
            x, _, layer_state = model.run_block(layer, x, (), None)
        for tensor in layer_state:
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), layer


def test_grad_checkpointing_gives_identical_gradients():
    idx = torch.randint(0, 37, (2, 9))
    plain = tiny_model(n_layer=2)
    checkpointed = tiny_model(n_layer=2, grad_cp=True)
    logits_a, grads_a = _loss_and_grads(plain, idx)
    logits_b, grads_b = _loss_and_grads(checkpointed, idx)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_frozen_embedding_still_gets_block_gradients_with_checkpointing():
    """The original's re-entrant checkpoint gave no gradients when the checkpoint input needs none."""
    model = tiny_model(grad_cp=True)
    model.emb.weight.requires_grad_(False)
    logits, _ = model(torch.randint(0, 37, (1, 5)))
    logits.sum().backward()
    assert model.blocks[0].att.time_first.grad is not None and model.blocks[0].att.time_first.grad.abs().sum() > 0


def test_ctx_parts_change_nothing():
    idx = torch.randint(0, 37, (2, 10))
    logits_a, grads_a = _loss_and_grads(tiny_model(), idx)
    logits_b, grads_b = _loss_and_grads(tiny_model(ctx_part_len=3), idx)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("shape", [{}, {"head_qk": 4}])
def test_loss_and_token_losses_equal_those_of_the_forward_logits(shape):
    """model.loss (chunked head) and model.token_losses are the loss and cross-entropies of forward's logits."""
    from src.loss import IGNORE_INDEX, language_model_loss

    model = tiny_model(**shape).double()
    idx = torch.randint(0, 37, (2, 9))
    targets = torch.randint(0, 37, (2, 9))
    targets[1, 4] = IGNORE_INDEX
    logits = model(idx)[0]
    expected = language_model_loss(logits, targets)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    got = model.loss(idx, targets)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x, _ = model.run_blocks(model.embed(idx))
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                                  reduction="none").view_as(targets)
    torch.testing.assert_close(model.token_losses(x, targets, idx), per_token, rtol=1e-12, atol=1e-12)
