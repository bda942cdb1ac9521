"""HostOffloadAdam (--strategy offload) on the CPU, where the host is the device: its step is torch's AdamW in fp32
with clipping and weight decay, and for bf16 weights it is MasterWeightAdam's step, gradient accumulation included:
bit for bit with the reference host step (master_adam_torch), and within fp32 rounding with the fused one it runs
(tests/optim/test_master_adam.py compares the two steps themselves)."""
import copy

import pytest
import torch

from helpers import refused_in_one_line, tiny_model
from src.optim.host_offload import HostOffloadAdam
from src.optim.master_adam import master_adam_host, master_adam_torch
from src.optim.master_weights import MasterWeightAdam

SETTINGS = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)


def two_groups(model, weight_decay):
    """The parameters in two groups, the matrices with weight decay, as build_param_groups makes them."""
    matrices = [p for p in model.parameters() if p.squeeze().dim() >= 2]
    others = [p for p in model.parameters() if p.squeeze().dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def train_steps(model, optimizer, batches, accumulation=1):
    for step_batches in (batches[i:i + accumulation] for i in range(0, len(batches), accumulation)):
        for x, y in step_batches:
            model.loss(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()


def batches(n, vocab=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    def tokens():
        return torch.randint(0, vocab, (2, 12), generator=generator)
    return [(tokens(), tokens()) for _ in range(n)]


@pytest.mark.parametrize("max_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_the_host_step_is_torch_adamw_in_fp32(max_norm):
    """fp32 weights: 3 steps equal torch.optim.AdamW (after torch's gradient clipping) within 1e-6 relative."""
    model = tiny_model(seed=1)
    reference = copy.deepcopy(model)
    offload = HostOffloadAdam(two_groups(model, 0.1), **SETTINGS, adamw=True, max_grad_norm=max_norm)
    adamw = torch.optim.AdamW(two_groups(reference, 0.1), **SETTINGS, foreach=False)
    data = batches(3)
    train_steps(model, offload, data)
    for x, y in data:
        reference.loss(x, y).backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        adamw.step()
        adamw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p - q).norm() <= 1e-6 * q.norm(), name
    masters = [m for group in offload.masters for m in group]
    assert all(torch.equal(m, p) for m, p in zip(masters, (p for g in offload.param_groups for p in g["params"])))


@pytest.mark.parametrize("host_step", [master_adam_torch, master_adam_host], ids=["reference", "fused"])
@pytest.mark.parametrize("adamw", [True, False], ids=["AdamW", "Adam"])
def test_bf16_weights_step_as_master_weight_adam_does_with_accumulation(adamw, host_step):
    """bf16 weights, 2 micro-batches per step, 3 steps: the masters and bf16 weights are MasterWeightAdam's (the
    --strategy auto path), the gradients summed in bf16 on the host as autograd sums them in .grad. With the
    reference host step, bit for bit; with the fused one, masters within 1e-6 relative and weights within one unit
    in the last place."""
    model = tiny_model(seed=2).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    offload = HostOffloadAdam(two_groups(model, 0.05), **SETTINGS, adamw=adamw, max_grad_norm=1.0,
                              host_step=host_step)
    master = MasterWeightAdam(two_groups(reference, 0.05), **SETTINGS, adamw=adamw, max_grad_norm=1.0, fused=False)
    data = batches(6, seed=3)
    train_steps(model, offload, data, accumulation=2)
    train_steps(reference, master, data, accumulation=2)
    exact = host_step is master_adam_torch
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        ulp = torch.finfo(torch.bfloat16).eps * q.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        assert torch.equal(p, q) if exact else ((p.float() - q.float()).abs() <= ulp).all(), name
    for ours, theirs in zip(offload.masters, master.masters):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b) if exact else (a - b).norm() <= 1e-6 * b.norm()


def test_gradients_leave_the_parameters_as_the_backward_makes_them():
    """No .grad stays on a parameter after its backward: the GPU would otherwise hold the whole model's gradients."""
    model = tiny_model(seed=4).to(torch.bfloat16)
    HostOffloadAdam(two_groups(model, 0.0), **SETTINGS, adamw=True, max_grad_norm=1.0)
    x, y = batches(1)[0]
    model.loss(x, y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_resuming_from_its_state_continues_exactly():
    model = tiny_model(seed=5).to(torch.bfloat16)
    optimizer = HostOffloadAdam(two_groups(model, 0.1), **SETTINGS, adamw=True, max_grad_norm=1.0)
    data = batches(4, seed=6)
    train_steps(model, optimizer, data[:2])
    saved_weights, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train_steps(model, optimizer, data[2:])
    resumed = tiny_model(seed=7).to(torch.bfloat16)
    resumed.load_state_dict(saved_weights)
    again = HostOffloadAdam(two_groups(resumed, 0.1), **SETTINGS, adamw=True, max_grad_norm=1.0)
    again.load_state_dict(saved_state)
    train_steps(resumed, again, data[2:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


@pytest.mark.parametrize("extra, message", [
    (["--precision", "bf16"], "--strategy offload keeps Adam's state in host memory for the weights on one GPU, and "
                              "this run has no CUDA GPU to train on; use --strategy auto"),
    (["--precision", "fp32"], "--strategy offload trains bf16 weights with fp32 masters in host memory; add "
                              "--precision bf16 (got --precision fp32)."),
])
def test_the_command_line_refuses_what_offload_cannot_train(extra, message, capsys, tmp_path):
    import train

    if torch.cuda.is_available() and extra == ["--precision", "bf16"]:
        pytest.skip("a GPU is there to train on")
    argv = ["--data_type", "dummy", "--strategy", "offload", "--proj_dir", str(tmp_path / "out"), *extra]
    assert train.main(argv) == 2
    assert capsys.readouterr().err == f"train.py: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_stopped_offload_run_is_sent_to_a_gpu_not_to_another_strategy(capsys, tmp_path):
    """Its bundle continues under --strategy offload only (a resumed run shares its bundle's flags), so "use
    --strategy auto" would be refused next: the line names the bundle and the machine it needs instead. The bundle
    is as a stopped offload run writes it, less the state the refusal never reads."""
    import train
    from src.config import parse_args
    from src.train.resuming import ResumeGuard, shaping_flags

    if torch.cuda.is_available():
        pytest.skip("a GPU is there to train on")
    argv = ["--data_type", "dummy", "--strategy", "offload", "--precision", "bf16", "--proj_dir", str(tmp_path / "out")]
    bundle = tmp_path / "out" / "rwkv-resume.ckpt"
    bundle.parent.mkdir()
    torch.save({"state_dict": {}, "loops": {}, "epoch": 0,
                "callbacks": {ResumeGuard.__qualname__: {"flags": shaping_flags(parse_args(argv))}}}, bundle)
    saved = bundle.read_bytes()
    assert train.main([*argv, "--resume", str(bundle)]) == 2
    assert capsys.readouterr().err == (
        f"train.py: error: --strategy offload keeps Adam's state in host memory for the weights on one GPU, and this "
        f"run has no CUDA GPU to train on; resume {bundle} on a machine with a CUDA GPU: its run trained with "
        f"--strategy offload, which only --strategy offload continues\n")
    assert bundle.read_bytes() == saved


@pytest.mark.parametrize("extra", [["--devices", "2"], ["--num_nodes", "2"]])
def test_single_device_refuses_several_devices(extra, capsys, tmp_path):
    """The strategy offload builds on (Lightning's SingleDeviceStrategy) trained on one CPU or GPU of --devices 2 and
    said nothing."""
    small = ["--n_layer", "1", "--n_embd", "32", "--ctx_len", "16", "--epoch_steps", "1", "--epoch_count", "1"]
    refused_in_one_line(["--data_type", "dummy", *small, "--strategy", "single_device", "--accelerator", "cpu", *extra,
                         "--proj_dir", str(tmp_path / "out")], capsys,
                        "--strategy single_device trains on one device", "use --strategy auto (or ddp) for several, "
                        "or --devices 1")
    assert not (tmp_path / "out").exists()
