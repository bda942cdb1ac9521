"""The fused elementwise functions (torch.compile, CUDA) against their reference twins: outputs and every gradient,
each function alone and inside the whole model (from an empty state and from a carried one, with --grad_cp)."""
import pytest
import torch

from src.models.rwkv4 import elementwise
from tests.helpers import tiny_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused functions run on CUDA tensors")
# relative error (norm of the difference / norm of the reference) of each output and gradient, fused vs reference
# in the same dtype: fp32 differs by the order of operations only; bf16 by the rounding of intermediates, which the
# fused kernels keep in fp32 and the reference rounds to bf16 after each operation
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def compiled_every_time():
    """torch.compile compiles a function anew for each dtype, grad mode and None-ness of `last` (shapes are dynamic),
    up to its recompile limit, after which it runs the function uncompiled: a test would then compare the
    reference with itself. This file needs more variants than a training run's few: raise the limit, and fail
    instead of falling back."""
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


def relative(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


def random_inputs(shapes, dtype, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype).requires_grad_() for shape in shapes]


def outputs_and_gradients(function, inputs, seed=1):
    """function(*inputs) -> its outputs, and the gradients of every input for a random upstream gradient."""
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.manual_seed(seed)
    upstream = [torch.randn_like(o) for o in outputs]
    gradients = torch.autograd.grad(outputs, [t for t in inputs if isinstance(t, torch.Tensor)], upstream)
    return [o.detach() for o in outputs] + list(gradients)


def assert_twins_agree(name, make_inputs, dtype, adapt=lambda function: function):
    """The fused and the reference `name`, each called through adapt(function) on fresh make_inputs(), give the
    same outputs and input gradients within TOLERANCE."""
    fused = getattr(elementwise.ops(True, torch.empty(0, device="cuda")), name)
    assert fused is not getattr(elementwise.REFERENCE, name)
    got = outputs_and_gradients(adapt(fused), make_inputs())
    expected = outputs_and_gradients(adapt(getattr(elementwise.REFERENCE, name)), make_inputs())
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
        assert relative(a, b) <= TOLERANCE[dtype], (name, i, relative(a, b))


def test_the_fused_functions_are_used_for_cuda_tensors_only():
    assert elementwise.ops(True, torch.zeros(1)) is elementwise.REFERENCE
    assert elementwise.ops(False, torch.zeros(1)) is elementwise.REFERENCE


ODD_SHAPES = [(3, 37, 40), (1, 1, 8), (2, 130, 96)]  # B, T, C


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, C", ODD_SHAPES)
@pytest.mark.parametrize("with_last", [False, True])
@pytest.mark.parametrize("count", [3, 2])  # time-mix mixes three projections' inputs, channel-mix two
def test_shifted_mixes(dtype, B, T, C, with_last, count):
    shapes = [(B, T, C)] + [(B, C)] * with_last + [(1, 1, C)] * count

    def adapt(function):  # every tensor a separate input, so that each gets its gradient
        def run(x, *rest):
            last, mixes = (rest[0], rest[1:]) if with_last else (None, rest)
            return function(x, last, tuple(mixes))
        return run

    assert_twins_agree("shifted_mixes", lambda: random_inputs(shapes, dtype), dtype, adapt)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, C", ODD_SHAPES)
def test_gates_and_squared_relu(dtype, B, T, C):
    assert_twins_agree("gate", lambda: random_inputs([(B, T, C)] * 2, dtype), dtype)
    assert_twins_agree("squared_relu", lambda: random_inputs([(B, T, 4 * C)], dtype), dtype)
    assert_twins_agree("gated_residual", lambda: random_inputs([(B, T, C)] * 3, dtype), dtype)


def loss_and_gradients(model, idx, targets, halves):
    """The model's loss on idx (B, T) and every parameter's gradient; with `halves` the sample runs as two
    segments, the second from the state the first leaves (what --state_cp and held-out evaluation do)."""
    model.zero_grad(set_to_none=True)
    if halves:
        cut = idx.shape[1] // 2
        x, state = model.run_blocks(model.embed(idx[:, :cut]))
        first = model.head_loss(x, targets[:, :cut])
        x, _ = model.run_blocks(model.embed(idx[:, cut:]), state)
        loss = (first * cut + model.head_loss(x, targets[:, cut:]) * (idx.shape[1] - cut)) / idx.shape[1]
    else:
        loss = model.loss(idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("halves, grad_cp", [(False, False), (True, False), (False, True)])
def test_the_fused_model_equals_the_reference_model(dtype, halves, grad_cp):
    """fp32: fused and reference within TOLERANCE. bf16, where three blocks of rounding differences add up: the
    fused model's distance from the fp32 model is at most 1.5 times the reference bf16 model's own (plus 1e-3)."""
    model = tiny_model(vocab_size=53, n_layer=3, n_embd=40, grad_cp=grad_cp).to("cuda")
    model.options.wkv_backend = "cuda"
    torch.manual_seed(2)
    idx, targets = (torch.randint(0, 53, (2, 45), device="cuda") for _ in range(2))
    oracle = loss_and_gradients(model, idx, targets, halves)
    model.to(dtype)
    model.options.fused = False
    reference = loss_and_gradients(model, idx, targets, halves)
    model.options.fused = True
    fused = loss_and_gradients(model, idx, targets, halves)
    pairs = [("loss", fused[0], reference[0], oracle[0])]
    pairs += [(name, fused[1][name], reference[1][name], oracle[1][name]) for name in oracle[1]]
    for name, got, expected, exact in pairs:
        if dtype == torch.float32:
            assert relative(got, expected) <= TOLERANCE[dtype], (name, relative(got, expected))
        else:
            assert relative(got, exact) <= 1.5 * relative(expected, exact) + 1e-3, \
                (name, relative(got, exact), relative(expected, exact))
