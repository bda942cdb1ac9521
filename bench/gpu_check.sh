#!/usr/bin/env bash
# On a CUDA machine: build the WKV kernel, run the GPU tests, the kernel benchmark, and compute-sanitizer
# (memcheck, racecheck) on a small case.
# Usage: bench/gpu_check.sh [LOG_DIR]   (logs: LOG_DIR/{build,tests,bench,sanitizer}.txt; default ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir="${1:-out}"
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python -c "import time; t = time.time(); from src.models.rwkv4 import wkv_cuda; wkv_cuda.EXTENSION.module(); print(f'WKV kernel built in {time.time() - t:.0f} s')" \
    2>&1 | tee "$log_dir/build.txt" || status=1
# no -q here: pytest.ini adds one, and a second hides the summary line
python -m pytest -m gpu -rs tests/models/rwkv4/test_wkv_cuda.py 2>&1 | tee "$log_dir/tests.txt" || status=1
python -m bench.wkv --profile 2>&1 | tee "$log_dir/bench.txt" || status=1

small_case='
import torch
from src.models.rwkv4.wkv import wkv
for dtype in (torch.float32, torch.bfloat16):
    k, v = (torch.randn(2, 300, 37, device="cuda").to(dtype).requires_grad_() for _ in range(2))
    w, u = (torch.randn(37, device="cuda", requires_grad=True) for _ in range(2))
    state = torch.rand(2, 37, 3, device="cuda", requires_grad=True)
    y, s = wkv(w, u, k, v, state, backend="cuda")
    (y.float().sum() + s[..., :2].sum()).backward()
torch.cuda.synchronize()
print("small case ran")'
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        timeout 150 compute-sanitizer --tool "$tool" --print-limit 10 python -c "$small_case" 2>&1 \
            | tail -n 15 | tee -a "$log_dir/sanitizer.txt" || status=1
    done
fi
exit $status
