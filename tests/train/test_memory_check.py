"""The pre-flight memory check: the footprint table, and one-line refusals naming the numbers."""
import pytest

from src.config import parse_args
from src.errors import UserInputError
from src.train.memory_check import GIB, Footprint, check_fits, footprint, pinned_rounding_bytes, run_need

SEVEN_B = 7_400_000_000  # the 7B shape: emb and head included
LORA_7B = 40_000_000


def flags(strategy, precision="bf16"):
    return parse_args(["--data_type", "dummy", "--strategy", strategy, "--precision", precision])


@pytest.mark.parametrize("strategy, gpu_gib, host_gib", [
    # the fork's 7B full fine-tune: bf16 weights on the card; DeepSpeed's 18 bytes per parameter on the host and 2
    # measured beyond them
    ("deepspeed_stage_2_offload", 13.8, 137.8),
    ("deepspeed_stage_2", 110.3, 0),
    ("deepspeed_stage_1", 110.3, 0),  # on one GPU every stage keeps all 16 bytes per parameter
    ("deepspeed_stage_3_offload", 0, 124.1),
    # bf16 weights and gradients, fp32 masters and Adam (16 bytes); the CUDA kernel's step allocates nothing
    ("auto", 110.3, 0),
    ("auto fp32", 110.3, 0),  # fp32 weights, fp32 gradients and Adam on the GPU
])
def test_full_fine_tune_of_7b_on_one_gpu(strategy, gpu_gib, host_gib):
    strategy, _, precision = strategy.partition(" ")
    need = footprint(flags(strategy, precision or "bf16"), SEVEN_B, SEVEN_B, world_size=1, processes_per_host=1,
                     on_gpu=True)
    assert need.gpu / GIB == pytest.approx(gpu_gib, abs=0.1) and need.host / GIB == pytest.approx(host_gib, abs=0.1)


def test_zero_partitions_are_shared_by_the_gpus():
    one = footprint(flags("deepspeed_stage_2"), SEVEN_B, SEVEN_B, world_size=1, processes_per_host=1, on_gpu=True)
    four = footprint(flags("deepspeed_stage_2"), SEVEN_B, SEVEN_B, world_size=4, processes_per_host=4, on_gpu=True)
    assert four.gpu == 2 * SEVEN_B + 14 * SEVEN_B // 4 < one.gpu
    offload = footprint(flags("deepspeed_stage_2_offload"), SEVEN_B, SEVEN_B, world_size=4, processes_per_host=2,
                        on_gpu=True)
    assert offload.host == 20 * SEVEN_B * 2 // 4  # this machine's two of the four partitions


def test_offload_counts_the_pinned_allocators_rounding_of_each_staging_buffer():
    """torch rounds each pinned allocation up to a power of two: a 4096 x 4096 bf16 buffer (32 MiB) loses nothing, a
    3584 x 3584 one (24.5 MiB) takes 32 MiB, and the estimate of a D3584 run under --strategy offload counts it."""
    assert pinned_rounding_bytes((4096 * 4096, 4096, 1)) == 0
    assert pinned_rounding_bytes((3584 * 3584, 3)) == 32 * 2 ** 20 - 2 * 3584 * 3584 + 8 - 6
    shape = ["--n_layer", "2", "--n_embd", "3584", "--vocab_size", "50277", "--precision", "bf16"]
    offload, deepspeed = (run_need(parse_args(["--data_type", "dummy", *shape, "--strategy", strategy]), 50277, 1, 1,
                                   True) for strategy in ("offload", "deepspeed_stage_2_offload"))
    assert "GiB of pinned-memory rounding" in offload.host_parts and "rounding" not in deepspeed.host_parts


def test_lora_needs_little_beyond_the_weights():
    need = footprint(flags("deepspeed_stage_1"), SEVEN_B, LORA_7B, world_size=1, processes_per_host=1, on_gpu=True)
    assert need.gpu < 2 * SEVEN_B + 16 * LORA_7B
    check_fits(flags("deepspeed_stage_1"), need, gpu_free=24 * GIB, host_available=100 * GIB)


def test_a_run_that_cannot_fit_is_refused_in_one_line():
    cfg = flags("deepspeed_stage_2")
    need = footprint(cfg, SEVEN_B, SEVEN_B, world_size=1, processes_per_host=1, on_gpu=True)
    with pytest.raises(UserInputError) as refused:
        check_fits(cfg, need, gpu_free=24 * GIB, host_available=None)
    message = str(refused.value)
    assert "\n" not in message and "110.3 GiB per GPU" in message and "24.0 GiB free" in message
    assert "deepspeed_stage_2_offload" in message
    with pytest.raises(UserInputError, match="117.0 GiB of host memory"):
        check_fits(cfg, Footprint(gpu=0, host=117 * GIB), gpu_free=None, host_available=100 * GIB)
    check_fits(cfg, need, gpu_free=None, host_available=None)  # nothing known, nothing refused


def test_train_refuses_a_model_the_host_cannot_hold_before_building_it(tmp_path, capsys):
    """L64 D16384 is 223e9 parameters: 3.6 TB of fp32 weights, gradients and Adam state on this CPU."""
    import train

    argv = ["--data_type", "dummy", "--n_layer", "64", "--n_embd", "16384", "--ctx_len", "16", "--micro_bsz", "1",
            "--epoch_steps", "1", "--epoch_count", "1", "--accelerator", "cpu", "--proj_dir", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB of host memory" in err and "--strategy auto" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_7b_offload_run_is_refused_on_a_128_gib_machine_before_anything_is_written(tmp_path, capsys):
    """The H200 machine's host: 125 GiB in all, 124.8 GiB available at the start of a run. DeepSpeed's ZeRO-2
    offload needs 18 bytes per parameter there (123.9 GiB for the 7B shape) and 2 more were measured, beside the
    process itself: refused in one line naming the parts, before a weight is read."""
    import train
    from src.train import memory_check

    argv = ["--load_model", str(tmp_path / "RWKV-4-7B.pth"), "--data_type", "numpy", "--data_file",
            str(tmp_path / "tokens.npy"), "--vocab_size", "50277", "--n_layer", "32", "--n_embd", "4096",
            "--ctx_len", "4096", "--ctx_parts", "4", "--micro_bsz", "1", "--grad_cp", "1", "--precision", "bf16",
            "--strategy", "deepspeed_stage_2_offload", "--proj_dir", str(tmp_path / "out")]
    cfg = parse_args(argv)
    need = memory_check.run_need(cfg, 50277, world_size=1, processes_per_host=1, on_gpu=True)
    C = 4096  # a block: 13 C^2 in its projections, 11 C in norms and time_*; then emb, head, ln0 and ln_out
    params = 32 * (13 * C ** 2 + 11 * C) + 2 * 50277 * C + 4 * C
    assert need.host == 20 * params + memory_check.PROCESS_HOST_BYTES[True]
    assert need.host / GIB == pytest.approx(142.7, abs=0.1) and need.gpu / GIB < 24  # the card is not the limit
    with pytest.raises(UserInputError) as refused:
        check_fits(cfg, need, gpu_free=24 * GIB, host_available=int(124.8 * GIB))
    message = str(refused.value)
    assert "\n" not in message and "need 142.7 GiB of host memory" in message and "124.8 GiB are available" in message
    assert "137.7 GiB of offloaded optimizer state" in message
    assert not (tmp_path / "out").exists()


def test_the_l32_d3840_offload_run_the_kernel_killed_is_refused():
    """On the H200 machine (123 GiB available) the check let this 6.52e9-parameter run through with 18 bytes per
    parameter (114.3 GiB) and the kernel killed it in its first optimizer step (a DataLoader worker's copies of the
    training's pages, since removed, were part of it). With the 20 bytes the check counts, it is refused."""
    from src.train import memory_check

    cfg = parse_args(["--load_model", "base.pth", "--data_type", "numpy", "--data_file", "tokens.npy", "--vocab_size",
                      "50277", "--n_layer", "32", "--n_embd", "3840", "--ctx_len", "4096", "--ctx_parts", "4",
                      "--micro_bsz", "1", "--grad_cp", "1", "--precision", "bf16", "--strategy",
                      "deepspeed_stage_2_offload"])
    need = memory_check.run_need(cfg, 50277, world_size=1, processes_per_host=1, on_gpu=True)
    with pytest.raises(UserInputError, match="need 126.5 GiB of host memory"):
        check_fits(cfg, need, gpu_free=24 * GIB, host_available=123 * GIB)
