"""head_loss and head_token_losses against their reference, the loss computed from whole logits."""
import pytest
import torch
import torch.nn.functional as F

from src import loss
from src.loss import IGNORE_INDEX, head_loss, head_token_losses, language_model_loss

# relative error of the loss and of each gradient against the reference in the same dtype
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(B, T, C, V, dtype, masked=(), device="cpu"):
    torch.manual_seed(0)
    x = torch.randn(B, T, C, dtype=torch.float64).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, C, dtype=torch.float64) / C ** 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T)).to(device)
    for b, t in masked:
        targets[b, t] = IGNORE_INDEX
    return x, weight, targets


def loss_and_grads(compute, x, weight, upstream=1.7):
    """The loss and the gradients of upstream * loss for x and weight (an incoming gradient other than 1)."""
    value = compute()
    grad_x, grad_w = torch.autograd.grad(upstream * value, (x, weight))
    return value.detach(), grad_x, grad_w


def relative(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, C, V, logits_per_chunk", [
    (2, 9, 12, 37, 64 * 4),  # a vocabulary padded from 37 to 64; chunks of 4 tokens, the last one shorter
    (1, 5, 7, 64, 64),  # an aligned vocabulary, a chunk per token
    (3, 11, 16, 130, None),  # everything in one chunk
])
def test_head_loss_equals_the_loss_of_whole_logits(dtype, B, T, C, V, logits_per_chunk):
    x, weight, targets = inputs(B, T, C, V, dtype, masked=[(0, 3), (B - 1, 0)])
    expected = loss_and_grads(lambda: language_model_loss(F.linear(x, weight), targets), x, weight)
    got = loss_and_grads(lambda: head_loss(x, weight, targets, logits_per_chunk=logits_per_chunk), x, weight)
    for name, a, b in zip(("loss", "dL/dx", "dL/dweight"), got, expected):
        assert a.dtype == b.dtype, name
        assert relative(a, b) <= TOLERANCE[dtype], (name, relative(a, b))


def test_the_sample_normalisers_of_a_segment_are_used():
    """A segment's loss divides by the whole sample's target count and L2Wrap by its positions."""
    x, weight, targets = inputs(2, 6, 8, 37, torch.float64, masked=[(1, 2)])
    count, positions = torch.tensor(23), 40
    expected = loss_and_grads(lambda: language_model_loss(F.linear(x, weight), targets, count, positions), x, weight)
    got = loss_and_grads(lambda: head_loss(x, weight, targets, count, positions, logits_per_chunk=128), x, weight)
    for a, b in zip(got, expected):
        assert relative(a, b) <= 1e-12


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_none():
    x, weight, targets = inputs(2, 6, 8, 37, torch.float32)
    weight.requires_grad_(False)
    value = head_loss(x, weight, targets)
    (grad_x,) = torch.autograd.grad(value, (x,))
    expected = torch.autograd.grad(language_model_loss(F.linear(x, weight), targets), (x,))[0]
    assert relative(grad_x, expected) <= 1e-5
    with torch.no_grad():
        assert not head_loss(x, weight, targets).requires_grad


def test_autocast_products_in_bf16_match_linear_under_autocast():
    """fp32 weights under bf16 autocast: the head's products run in bf16 like F.linear's, the loss in fp32."""
    x, weight, targets = inputs(2, 8, 16, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(lambda: language_model_loss(F.linear(x, weight), targets), x, weight)
        got = loss_and_grads(lambda: head_loss(x, weight, targets, logits_per_chunk=64 * 5), x, weight)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, expected):
        assert relative(a, b) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_token_losses_are_each_targets_cross_entropy(dtype):
    x, weight, targets = inputs(2, 9, 12, 37, dtype, masked=[(0, 3), (1, 8)])
    expected = F.cross_entropy(F.linear(x, weight).flatten(0, 1).to(torch.promote_types(dtype, torch.float32)),
                               targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    got = head_token_losses(x, weight, targets, logits_per_chunk=64 * 4)
    assert got.shape == targets.shape and not got.requires_grad
    assert got[0, 3] == 0 and got[1, 8] == 0
    assert relative(got, expected) <= TOLERANCE[dtype]


def test_padding_leaves_the_vocabulary_alone(monkeypatch):
    """The alignment only pads the products: any VOCAB_ALIGNMENT gives the same loss and gradients."""
    x, weight, targets = inputs(2, 5, 8, 37, torch.float64, masked=[(0, 1)])
    results = []
    for alignment in (1, 64, 128):
        monkeypatch.setattr(loss, "VOCAB_ALIGNMENT", alignment)
        results.append(loss_and_grads(lambda: head_loss(x, weight, targets), x, weight))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert relative(a, b) <= 1e-13


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_on_the_gpu_with_an_unaligned_vocabulary(dtype):
    """On CUDA the padded products take cuBLAS's aligned kernels; the results are those of the whole logits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x, weight, targets = inputs(3, 1000, 256, 50277, dtype, masked=[(0, 3), (2, 999)], device="cuda")
    expected = loss_and_grads(lambda: language_model_loss(F.linear(x, weight), targets), x, weight)
    got = loss_and_grads(lambda: head_loss(x, weight, targets, logits_per_chunk=2 ** 24), x, weight)  # 4 chunks
    for name, a, b in zip(("loss", "dL/dx", "dL/dweight"), got, expected):
        assert relative(a, b) <= TOLERANCE[dtype], (name, relative(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1000, 4096])  # one chunk of logits; four chunks, summed in fp32
def test_head_loss_working_memory_stays_within_its_estimate(tokens):
    """What the forward allocates beyond its inputs (its working memory and the gradients it keeps for backward)
    is at most head_loss_bytes, the figure the memory check counts, and not much less (the estimate is tight)."""
    x, weight, targets = inputs(1, tokens, 1024, 50277, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    head_loss(x, weight, targets)
    used = torch.cuda.max_memory_allocated() - before
    estimate = loss.head_loss_bytes(tokens, 50277, 1024, 2, head_trains=True)
    print(f"\n[head_loss] {tokens} tokens: peak {used / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB")
    assert 0.95 * estimate <= used <= estimate + 2 ** 20  # + small tensors: per-token maxima, masks, sums
