"""DeepSpeed ZeRO-2 offload on a card capped below twice the weights: the set-up and training stay under the cap.

DeepSpeed's ZeRO-2 set-up copies each optimizer parameter group whole on the GPU (src/train/memory_check.py,
OPTIMIZER_GROUP_NUMEL). L32 D2560 (2.7B parameters, 5.5 GB in bf16) in one group would need 11 GB at that
moment; a 10 GiB card holds the weights, DeepSpeed's buffers, the activations of ctx 1024 and the CUDA
libraries' own memory (the memory check's estimate: 9.0 GiB) only when the groups are bounded. (A 9 GiB cap,
this test's first choice, ran out of memory in cuBLAS's set-up: 1.6 GiB of the card are outside PyTorch's
allocator, which the check did not count then.) Run on a CUDA machine with deepspeed:
`python -m pytest -m gpu -s tests/train/test_gpu_memory.py`.
"""
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
CAP_GIB = 10.0


@needs_deepspeed
@pytest.mark.gpu
def test_zero2_offload_set_up_and_steps_stay_under_the_cap():
    command = [sys.executable, "-m", "bench.seven_b_offload", "--gpu_gib", str(CAP_GIB), "--steps", "2",
               "--ctx_len", "1024", "--n_layer", "32", "--n_embd", "2560"]
    child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and found, (child.stdout + child.stderr)[-4000:]
    result = json.loads(found[-1][len("RESULT "):])  # the bench's own line, after its child's (no host figures)
    print(f"\n[offload] L32 D2560 capped at {CAP_GIB:g} GiB: peak {result['peak_allocated_gib']:.2f} / "
          f"{result['peak_reserved_gib']:.2f} GiB (estimate {result['estimate_gpu_gib']:.2f}), host PSS "
          f"{result['pss_gib']:.1f} GiB (estimate {result['estimate_host_gib']:.1f}; pinned "
          f"{result['pinned_gib']:.1f}), "
          f"{result['seconds_per_step']:.1f} s per step, losses {result['losses']}")
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["peak_reserved_gib"] <= CAP_GIB
