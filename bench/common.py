"""What the GPU benchmarks share: a card made to look smaller, step times of a real train.py run, the bf16
matmul rate of this card (the hardware limit the tables compare against), peak memory without the filler.
"""
import statistics
import time

import lightning.pytorch as pl
import torch

GIB = 2 ** 30


def cap_gpu_memory(gib: float) -> int:
    """Leave `gib` GiB free on GPU 0 with a filler allocation and cap the allocator at filler + `gib` GiB.

    DeepSpeed sizes its buffers from the card's free memory, which the allocator fraction alone does not
    change, so the filler is what makes a large card look like a small one. Returns the filler's bytes.
    """
    cap = int(gib * GIB)
    free, total = torch.cuda.mem_get_info(0)
    filler = torch.empty(max(free - cap, 0), dtype=torch.uint8, device="cuda:0")
    torch.cuda.set_per_process_memory_fraction((filler.numel() + cap) / total, 0)
    torch.cuda.reset_peak_memory_stats(0)
    cap_gpu_memory.filler = filler  # kept alive for the process
    return filler.numel()


def peak_gib(filler_bytes: int = 0) -> tuple:
    """(peak allocated, peak reserved) GiB on GPU 0, without the filler."""
    return ((torch.cuda.max_memory_allocated(0) - filler_bytes) / GIB,
            (torch.cuda.max_memory_reserved(0) - filler_bytes) / GIB)


class StepTimes(pl.Callback):
    """Wall time of each optimizer step of a train.py run (data loading and Lightning included), GPU synced."""

    def __init__(self):
        self.ends = []

    def on_train_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def steady_seconds(self, warmup: int = 1) -> float:
        """Median seconds per step after the first `warmup` steps (all steps when there are no more)."""
        durations = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return statistics.median(durations[warmup:] or durations)


def matmul_tflops(size: int = 8192) -> float:
    """bf16 matmul rate of this card, median of 10 CUDA-event timed products of random size^3 matrices."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size ** 3 / statistics.median(times) / 1e12
