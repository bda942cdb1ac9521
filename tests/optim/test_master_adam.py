"""The master-weight Adam step's twins: the reference against torch's Adam and AdamW, the CUDA kernel and the host
(fused CPU) step against the reference (all dtypes, sizes across the kernel's chunk boundaries, tensors at odd offsets
in shared storage)."""
import pytest
import torch

from src.optim.master_adam import master_adam_cuda, master_adam_host, master_adam_torch

gpu = pytest.mark.gpu
SETTINGS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
CHUNK = 1 << 16  # the kernel's elements per block (src/optim/cuda/master_adam.cu kChunk)
# one element; fewer than a thread's stride; one chunk and one more; several chunks and a ragged end; 2-D
SIZES = [(1,), (7,), (CHUNK + 1,), (3 * CHUNK + 517,), (129, 1031)]


def random_problem(dtype, device, sizes=SIZES, seed=0):
    """Weights, fp32 masters they round from, zero moments; each tensor a view at an odd offset into one storage
    with untouched elements around it (to catch writes outside a tensor)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() + 3 for s in sizes)
    storages = {name: torch.zeros(total + 1, dtype=torch.float32) for name in ("master", "exp_avg", "exp_avg_sq")}
    storages["weight"] = torch.zeros(total + 1, dtype=dtype)
    storages["master"].normal_(generator=generator)
    storages = {name: t.to(device) for name, t in storages.items()}
    parts = {name: [] for name in storages}
    offset = 1
    for size in sizes:
        numel = torch.Size(size).numel()
        for name, storage in storages.items():
            parts[name].append(storage[offset:offset + numel].view(size))
        offset += numel + 3
    for weight, master in zip(parts["weight"], parts["master"]):
        weight.copy_(master)
    return storages, parts


def gradients(parts, dtype, seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    return [(torch.randn(w.shape, generator=generator) * 1e-2).to(w.device, dtype) for w in parts["weight"]]


def run(step_function, parts, grads, step, weight_decay, adamw, clip):
    step_function(parts["weight"], grads, parts["master"], parts["exp_avg"], parts["exp_avg_sq"], **SETTINGS,
                  weight_decay=weight_decay, adamw=adamw, step=step, clip=clip)


@pytest.mark.parametrize("adamw, weight_decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
@pytest.mark.parametrize("clip", [None, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_torch_adam_on_the_masters(adamw, weight_decay, clip, dtype):
    sizes = [(5,), (3, 4)]
    _, parts = random_problem(dtype, "cpu", sizes)
    masters = [m.detach().clone().requires_grad_() for m in parts["master"]]
    torch_adam = (torch.optim.AdamW if adamw else torch.optim.Adam)(masters, **SETTINGS, weight_decay=weight_decay)
    for step in (1, 2, 3):
        grads = gradients(parts, dtype, step)
        for master, grad in zip(masters, grads):
            master.grad = grad.float() * (1.0 if clip is None else clip)
        torch_adam.step()
        given = [g.clone() for g in grads]
        run(master_adam_torch, parts, grads, step, weight_decay, adamw,
            None if clip is None else torch.tensor(clip))
        assert all(torch.equal(g, before) for g, before in zip(grads, given))  # the gradients are left as they were
        for ours, theirs in zip(parts["master"], masters):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
        for name, key in (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            for ours, master in zip(parts[name], masters):
                torch.testing.assert_close(ours, torch_adam.state[master][key], rtol=1e-6, atol=1e-12)
        for weight, master in zip(parts["weight"], parts["master"]):
            assert torch.equal(weight, master.to(dtype))


def test_kernel_wrapper_names_the_tensor_it_cannot_take():
    _, parts = random_problem(torch.bfloat16, "cpu", [(4,), (2, 3)])
    grads = gradients(parts, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="must be on a CUDA device, got cpu"):
        run(master_adam_cuda, parts, grads, 1, 0.0, False, None)
    if torch.cuda.is_available():
        parts = {name: [t.cuda() for t in tensors] for name, tensors in parts.items()}
        grads = [grads[0].cuda(), grads[1].cuda().t()]
        with pytest.raises(ValueError, match="tensor 1's gradient must be a contiguous torch.bfloat16 tensor"):
            run(master_adam_cuda, parts, grads, 1, 0.0, False, None)


def ill_conditioned(grads, masters, clip, weight_decay, adamw):
    """Elements where Adam's coupled weight decay cancels the clipped gradient to below 1e-6: the step there,
    about lr * g / (|g| + eps), turns on the last bits of g, which the twins round apart (the kernel's fused
    multiply-add against the reference's two operations), as torch's fused and foreach Adam do."""
    if not weight_decay or adamw:
        return [torch.zeros_like(m, dtype=torch.bool) for m in masters]
    scale = 1.0 if clip is None else clip
    return [(g.float() * scale + weight_decay * m).abs() < 1e-6 for g, m in zip(grads, masters)]


@gpu
@pytest.mark.parametrize("shared", [False, True])  # allocations of their own (aligned), views at odd offsets
@pytest.mark.parametrize("adamw, weight_decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
@pytest.mark.parametrize("clip", [None, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_reference(adamw, weight_decay, clip, dtype, shared):
    """Three steps of both twins from the same start: masters and moments within fp32 rounding (the kernel's fused
    multiply-adds round apart from the reference's separate operations) except where weight decay cancels the
    gradient (ill_conditioned), weights exactly the rounded masters, and nothing written between the tensors."""
    (kernel_storages, kernel), (_, reference) = (random_problem(dtype, "cuda") for _ in range(2))
    guards = {}  # per storage, the elements that belong to no tensor (set to 7 and checked at the end)
    if shared:
        for name, storage in kernel_storages.items():
            guards[name] = torch.ones(storage.numel(), dtype=torch.bool, device="cuda")
            for t in kernel[name]:
                guards[name][t.storage_offset():t.storage_offset() + t.numel()] = False
            storage[guards[name]] = 7.0
    else:  # the same values in allocations of their own
        kernel = {name: [t.clone() for t in tensors] for name, tensors in kernel.items()}
        assert all(t.data_ptr() % 16 == 0 for tensors in kernel.values() for t in tensors)
    clip_tensor = None if clip is None else torch.tensor(clip, device="cuda")
    skipped = [torch.zeros_like(m, dtype=torch.bool) for m in reference["master"]]
    for step in (1, 2, 3):
        grads = gradients(kernel, dtype, step)
        for mask, ill in zip(skipped, ill_conditioned(grads, reference["master"], clip, weight_decay, adamw)):
            mask |= ill
        run(master_adam_cuda, kernel, grads, step, weight_decay, adamw, clip_tensor)
        run(master_adam_torch, reference, grads, step, weight_decay, adamw, clip_tensor)
    assert sum(int(m.sum()) for m in skipped) <= 1e-4 * sum(m.numel() for m in skipped)  # 9-17 of 396,000
    for name in ("master", "exp_avg", "exp_avg_sq"):
        for got, want, mask in zip(kernel[name], reference[name], skipped):
            torch.testing.assert_close(got[~mask], want[~mask], rtol=1e-5, atol=1e-6 * want.abs().max().item())
    for weight, master in zip(kernel["weight"], kernel["master"]):
        assert torch.equal(weight, master.to(dtype))
    for name, guard in guards.items():
        assert torch.all(kernel_storages[name][guard] == 7.0), name


@pytest.mark.parametrize("adamw, weight_decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
@pytest.mark.parametrize("clip", [None, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_step_equals_reference(adamw, weight_decay, clip, dtype):
    """Three steps of torch's fused CPU Adam (--strategy offload's host step) and the reference from the same start:
    masters and moments within fp32 rounding (the fused kernel orders its operations differently) except where
    weight decay cancels the gradient, weights exactly the rounded masters, the gradients left as they were, and
    nothing written between the tensors."""
    (storages, host), (_, reference) = (random_problem(dtype, "cpu") for _ in range(2))
    guards = {}
    for name, storage in storages.items():
        guards[name] = torch.ones(storage.numel(), dtype=torch.bool)
        for t in host[name]:
            guards[name][t.storage_offset():t.storage_offset() + t.numel()] = False
        storage[guards[name]] = 7.0
    clip_tensor = None if clip is None else torch.tensor(clip)
    skipped = [torch.zeros_like(m, dtype=torch.bool) for m in reference["master"]]
    for step in (1, 2, 3):
        grads = gradients(host, dtype, step)
        given = [g.clone() for g in grads]
        for mask, ill in zip(skipped, ill_conditioned(grads, reference["master"], clip, weight_decay, adamw)):
            mask |= ill
        run(master_adam_host, host, grads, step, weight_decay, adamw, clip_tensor)
        run(master_adam_torch, reference, grads, step, weight_decay, adamw, clip_tensor)
        assert all(torch.equal(g, before) for g, before in zip(grads, given))
    assert sum(int(m.sum()) for m in skipped) <= 1e-4 * sum(m.numel() for m in skipped)
    for name in ("master", "exp_avg", "exp_avg_sq"):
        for got, want, mask in zip(host[name], reference[name], skipped):
            torch.testing.assert_close(got[~mask], want[~mask], rtol=1e-5, atol=1e-6 * want.abs().max().item())
    for weight, master in zip(host["weight"], host["master"]):
        assert torch.equal(weight, master.to(dtype))
    for name, guard in guards.items():
        assert torch.all(storages[name][guard] == 7.0), name
