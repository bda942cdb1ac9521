"""MasterWeightAdam: bf16 weights stepped through fp32 masters, against torch's Adam on the fp32 masters."""
import copy
import shutil

import pytest
import torch

import train
from helpers import stopped_by_one_sigint, tiny_model
from src.io.checkpoint import load_weights
from src.optim.master_weights import MasterWeightAdam

SETTINGS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)


def bf16_model_and_masters(device="cpu"):
    model = tiny_model(n_layer=1).to(device, torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    return model, masters


def backward(model, seed):
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    idx, targets = torch.randint(0, 37, (2, 8)).to(device), torch.randint(0, 37, (2, 8)).to(device)
    model.loss(idx, targets).backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # fused Adam on CUDA
@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])  # no clipping; clipping every step
def test_steps_equal_adam_on_fp32_masters_with_the_global_clip(max_grad_norm, device):
    model, masters = bf16_model_and_masters(device)
    params = list(model.parameters())
    # two groups with their own LR, as the layer-wise LR makes them
    groups = [{"params": params[:3], "lr": 2e-2, "lr_scale": 2.0}, {"params": params[3:], "lr": 1e-2, "lr_scale": 1.0}]
    optimizer = MasterWeightAdam(groups, **SETTINGS, adamw=False, max_grad_norm=max_grad_norm)
    reference = torch.optim.Adam([{"params": masters[:3], "lr": 2e-2}, {"params": masters[3:], "lr": 1e-2}],
                                 **{k: v for k, v in SETTINGS.items() if k != "lr"})
    for step in range(3):
        backward(model, step)
        grads = [p.grad.float() for p in params]
        if max_grad_norm:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            grads = [g * min(1.0, max_grad_norm / (norm.item() + 1e-6)) for g in grads]
        for master, grad in zip(masters, grads):
            master.grad = grad
        reference.step()
        optimizer.step()
        optimizer.zero_grad()
        ours = optimizer.masters[0] + optimizer.masters[1]
        for got, master in zip(ours, masters):  # CUDA's fused Adam rounds apart from the reference's foreach Adam
            torch.testing.assert_close(got, master.detach(), rtol=1e-6, atol=1e-7)
        for p, master in zip(params, ours):
            assert p.dtype == torch.bfloat16 and p.grad is None
            assert torch.equal(p.detach(), master.to(torch.bfloat16))  # the weights are the rounded masters


def test_state_dict_restores_masters_and_moments_exactly():
    def stepped(optimizer, model, seeds):
        for seed in seeds:
            backward(model, seed)
            optimizer.step()
            optimizer.zero_grad()

    model, _ = bf16_model_and_masters()
    optimizer = MasterWeightAdam([{"params": list(model.parameters())}], **SETTINGS, adamw=True, max_grad_norm=1.0)
    stepped(optimizer, model, [0, 1])
    # copies, as a checkpoint file holds them
    saved_weights, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    stepped(optimizer, model, [2, 3])

    again, _ = bf16_model_and_masters()
    again.load_state_dict(saved_weights)
    restored = MasterWeightAdam([{"params": list(again.parameters())}], **SETTINGS, adamw=True, max_grad_norm=1.0)
    restored.load_state_dict(saved_state)
    stepped(restored, again, [2, 3])
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_parameter_without_gradient_is_not_stepped_and_keeps_its_own_count(device):
    """As torch's Adam: a parameter with no gradient in a step is left alone, and its bias correction later counts
    only its own steps (the optimizer then steps one group in two launches, one per step number)."""
    model, masters = bf16_model_and_masters(device)
    params = list(model.parameters())
    optimizer = MasterWeightAdam([{"params": params}], **SETTINGS, adamw=False, max_grad_norm=0.0)
    reference = torch.optim.Adam(masters, **SETTINGS)
    for step in range(3):
        backward(model, step)
        if step == 0:
            params[1].grad = None  # ln0's bias sits out the first step
        for master, p in zip(masters, params):
            master.grad = None if p.grad is None else p.grad.float()
        reference.step()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.steps[0][:3] == [3, 2, 3]
    for got, master in zip(optimizer.masters[0], masters):
        torch.testing.assert_close(got, master.detach(), rtol=1e-6, atol=1e-7)


def test_resume_bundles_from_before_the_kernel_load(tmp_path):
    """Bundles written when torch's Adam over the masters held the moments (its state_dict under "inner") resume
    to the same weights as a run that never stopped."""
    straight, _ = bf16_model_and_masters()
    optimizer = MasterWeightAdam([{"params": list(straight.parameters())}], **SETTINGS, adamw=False, max_grad_norm=1.0)
    for seed in (0, 1, 2):
        backward(straight, seed)
        optimizer.step()
        optimizer.zero_grad()

    # the old optimizer's state after two steps: torch's Adam over fp32 masters, its parameters numbered in order
    old_model, old_masters = bf16_model_and_masters()
    torch_adam = torch.optim.Adam(old_masters, **SETTINGS)
    for seed in (0, 1):
        backward(old_model, seed)
        grads = [p.grad.float() for p in old_model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)))
        for master, grad in zip(old_masters, grads):
            master.grad = grad * (1.0 / (norm + 1e-6)).clamp(max=1.0)
        torch_adam.step()
        with torch.no_grad():
            for p, master in zip(old_model.parameters(), old_masters):
                p.copy_(master)
                p.grad = None
    old_state = {"param_groups": [{"lr": SETTINGS["lr"], "betas": SETTINGS["betas"], "eps": SETTINGS["eps"],
                                   "weight_decay": 0.0}],
                 "inner": torch_adam.state_dict(), "masters": [[m.detach() for m in old_masters]]}
    torch.save(old_state, tmp_path / "old.pt")

    resumed = MasterWeightAdam([{"params": list(old_model.parameters())}], **SETTINGS, adamw=False, max_grad_norm=1.0)
    resumed.load_state_dict(torch.load(tmp_path / "old.pt"))
    assert resumed.steps == [[2] * len(old_masters)]
    backward(old_model, 2)
    resumed.step()
    for a, b in zip(straight.parameters(), old_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


BF16_RUN = ["--data_type", "utf-8", "--data_file", "text.txt", "--proj_dir", "out", "--n_layer", "1", "--n_embd", "16",
            "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "40", "--epoch_count", "2", "--epoch_save", "1",
            "--wkv_backend", "torch", "--enable_progress_bar", "0", "--random_seed", "3", "--precision", "bf16",
            "--lr_init", "3e-3", "--lr_final", "1e-3"]


def test_a_bf16_run_trains_bf16_weights_and_resumes_exactly(tmp_path, monkeypatch):
    """--precision bf16 on one device: bf16 parameters in the model during training, bf16 files, a falling loss,
    and Ctrl+C + --resume ends with the weights of a run that never stopped (the masters travel in the bundle)."""
    for name in ("straight", "stopped"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    monkeypatch.chdir(tmp_path / "straight")
    seen = []

    class ParameterDtypes(__import__("lightning").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({p.dtype for p in pl_module.parameters()})

    assert train.train(train.parse_args(BF16_RUN), [ParameterDtypes()]) == 0
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    log = (tmp_path / "straight" / "out" / "train_log.txt").read_text().splitlines()
    epoch_losses = [float(line.split()[1]) for line in log if line[:1].isdigit()]
    assert epoch_losses[1] < epoch_losses[0]
    straight = load_weights(tmp_path / "straight" / "out" / "rwkv-final.pth")
    assert {v.dtype for v in straight.values()} == {torch.bfloat16}

    monkeypatch.chdir(tmp_path / "stopped")
    assert stopped_by_one_sigint(BF16_RUN, tmp_path / "stopped" / "out") == 130
    assert train.main([*BF16_RUN, "--resume", "out/rwkv-resume.ckpt"]) == 0
    resumed = load_weights(tmp_path / "stopped" / "out" / "rwkv-final.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    shutil.rmtree(tmp_path / "stopped" / "out")
