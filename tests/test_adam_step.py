"""The per-parameter Adam step through an fp32 master (src/adam_step.py): the reference against torch's Adam and
AdamW on fp32 weights, and the fused (compiled, CUDA) twin against the reference."""
import pytest
import torch

from src import adam_step

BETAS = [(0.9, 0.99), (0.9, 0.999)]  # the fork's default, and torch's (whose 1 - 0.999^1 fp32 would round)
# odd sizes, flattened as the optimizer passes them
SHAPES = [(7,), (13, 5), (1, 1, 33), (4099,)]


def relative(got, expected) -> float:
    """Norm of the difference over the norm of the expected: the moments differ from torch's by a few ulp where
    the order of fp32 operations differs (torch's CPU Adam lerps the first moment), large only element by element
    where a moment is near zero."""
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def scalars(lr, weight_decay, clip, device):
    return [torch.tensor(value, dtype=torch.float32, device=device) for value in (lr, weight_decay, clip)]


def run_steps(step_one, params, masters, grads_per_step, betas, lr, weight_decay, clip, decoupled):
    """`len(grads_per_step)` steps of every parameter with step_one; returns (exp_avgs, exp_avg_sqs)."""
    device = masters[0].device
    exp_avgs = [torch.zeros_like(m) for m in masters]
    exp_avg_sqs = [torch.zeros_like(m) for m in masters]
    steps = [torch.zeros((), device=device) for _ in masters]
    for grads in grads_per_step:
        for param, grad, master, m, v, step in zip(params, grads, masters, exp_avgs, exp_avg_sqs, steps):
            step += 1
            step_one(param.view(-1), grad.reshape(-1), master.view(-1), m.view(-1), v.view(-1), step,
                     *scalars(lr, weight_decay, clip, device), beta1=betas[0], beta2=betas[1], eps=1e-8,
                     decoupled=decoupled)
    return exp_avgs, exp_avg_sqs


def random_masters_and_grads(device, dtype, n_steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    masters = [torch.randn(shape, generator=generator).to(device) for shape in SHAPES]
    grads = [[(torch.randn(shape, generator=generator) * 10 ** (-i % 3)).to(device, dtype) for i, shape in
              enumerate(SHAPES)] for _ in range(n_steps)]
    return masters, grads


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("decoupled, weight_decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_reference_is_torch_adam_on_the_masters(betas, decoupled, weight_decay):
    lr, clip = 1e-2, 0.37
    masters, grads = random_masters_and_grads("cpu", torch.bfloat16, n_steps=4)
    params = [m.to(torch.bfloat16) for m in masters]
    ours = [m.clone() for m in masters]
    exp_avgs, exp_avg_sqs = run_steps(adam_step.adam_step_, params, ours, grads, betas, lr, weight_decay, clip,
                                      decoupled)
    theirs = [m.clone().requires_grad_() for m in masters]
    torch_adam = (torch.optim.AdamW if decoupled else torch.optim.Adam)(theirs, lr=lr, betas=betas, eps=1e-8,
                                                                         weight_decay=weight_decay)
    for step_grads in grads:
        for master, grad in zip(theirs, step_grads):
            master.grad = grad.float() * clip
        torch_adam.step()
    for got, expected, m, v, master in zip(ours, theirs, exp_avgs, exp_avg_sqs, theirs):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)
        assert relative(m, torch_adam.state[master]["exp_avg"]) < 1e-6
        assert relative(v, torch_adam.state[master]["exp_avg_sq"]) < 1e-6
    for param, master in zip(params, ours):
        assert torch.equal(param, master.to(torch.bfloat16))  # the 16-bit weights are the rounded masters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused step runs on CUDA tensors")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_step_is_the_reference(dtype, decoupled):
    masters, grads = random_masters_and_grads("cuda", dtype, n_steps=3)
    results = {}
    for name, step_one in (("reference", adam_step.adam_step_), ("fused", adam_step.step_function(fused=True))):
        params = [m.to(dtype) for m in masters]
        stepped = [m.clone() for m in masters]
        moments = run_steps(step_one, params, stepped, grads, (0.9, 0.999), 1e-3, 0.1, 0.5, decoupled)
        results[name] = (params, stepped, *moments)
    for got, expected in zip(results["fused"][1:], results["reference"][1:]):  # masters and both moments, fp32
        for a, b in zip(got, expected):
            assert relative(a, b) < 1e-6  # the order of fp32 operations only
    for param, master in zip(results["fused"][0], results["fused"][1]):
        assert param.dtype == dtype and torch.equal(param, master.to(dtype))
