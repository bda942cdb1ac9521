#!/usr/bin/env bash
# The GPU measurements BENCHMARKS.md records, as named stages run one after another on one CUDA machine, each under
# a time limit, with one log per command and a summary line per command in LOG_DIR/summary.txt (the card first).
# Device time is scarce: pick the stages that fit a call, and read summary.txt for what ran and how it ended.
#
# Usage: bench/gpu_session.sh LOG_DIR SECONDS STAGE...
#   SECONDS  the wall-clock budget of this call: a command starts only with 30 s left, and is stopped 10 s before
#            the end, so that the logs come back whole
# Stages:
#   suite          every `pytest -m gpu` test: tests/train/test_gpu_memory.py alone (it leaves the card nearly full),
#                  the others in five parallel streams (separate pytest temp folders)
#   long_context BEFORE_DIR
#                  bench.long_context --lengths 4096 131072 on the tree at BEFORE_DIR (e.g. `git archive REV | tar -x
#                  -C BEFORE_DIR`), then on this one, one after the other on the same random base, then the first
#                  again at 4096
#   offload_7b     bench.seven_b_offload for the 7B shape under --strategy offload, card capped at 24 GiB
#   offload_pair   bench.seven_b_offload L32 D3584 under offload and deepspeed_stage_2_offload, accumulation 1 and 8
#   rwkv7_speed    bench.rwkv7_speed beside BlinkDL's train_temp (bench/stage_blinkdl_v7.sh staged .blinkdl_v7)
#   x070_long_context
#                  bench.long_context --model x070 (the 2.9B shape) at 4096 and 131072
#   wkv7           bench.wkv7
#   throughput ORIGINAL_DIR
#                  bench.train_throughput at L24 D1024 and L24 D2048 under auto and deepspeed_stage_2, and the
#                  original's forward + backward from ORIGINAL_DIR (../shared/tools/original-layout.sh) beside it
# Example: bench/gpu_session.sh out 580 suite
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir=$1; budget=$2; shift 2
stages=("$@")
for (( i = 0; i < ${#stages[@]}; i++ )); do  # every stage known, every folder there, before any device time is spent
    case ${stages[$i]} in
        suite|offload_7b|offload_pair|rwkv7_speed|x070_long_context|wkv7) ;;
        long_context|throughput)
            i=$(( i + 1 ))
            [[ -d ${stages[$i]:-} ]] || { echo "${stages[$i - 1]} needs a folder: got '${stages[$i]:-}'" >&2; exit 2; } ;;
        *) echo "unknown stage: ${stages[$i]} (see the usage at the top of $0)" >&2; exit 2 ;;
    esac
done
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)
deadline=$(( $(date +%s) + budget ))
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$log_dir/card.txt"
summary="$log_dir/summary.txt"
echo "card: $(cat "$log_dir/card.txt"); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$summary"

# run NAME MAX_SECONDS COMMAND...: the command under a limit of MAX_SECONDS or what the budget leaves; its output in
# NAME.log, one line in summary.txt: the exit code, the seconds, and the log's last line (pytest's summary)
run() {
    local name=$1 max=$2; shift 2
    local left=$(( deadline - $(date +%s) - 10 ))
    if (( left < 20 )); then
        echo "$name: not run (the call's budget is spent)" >> "$summary"
        return
    fi
    local limit=$(( max < left ? max : left )) start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$log_dir/$name.log" 2>&1
    local rc=$?
    echo "$name: rc $rc in $(( $(date +%s) - start )) s (limit $limit): $(tail -n 1 "$log_dir/$name.log")" >> "$summary"
}

# the processes on the GPU have ended (a stopped command's children included) before the next command starts
gpu_idle() {
    while [[ -n "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ]] && (( $(date +%s) < deadline )); do
        sleep 2
    done
}

gpu_test_files() {
    grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort
}

suite() {
    # the longest files (measured 2026-12-08: the operations file 482 s, the state_cp and models folders most of two
    # other streams' 445 s and 333 s) get streams of their own; every other file with GPU tests the last stream
    local ops=tests/test_gpu_operations.py memory=tests/train/test_gpu_memory.py
    local -a rest=()
    mapfile -t rest < <(gpu_test_files | grep -v -e "^$ops$" -e "^$memory$" -e "^tests/train/state_cp/" -e "^tests/models/")
    local pytest=(python -m pytest -m gpu -rs -p no:cacheprovider)
    run suite_ops_strategies 560 "${pytest[@]}" --basetemp=/tmp/pt1 "$ops" -k each_strategy &
    run suite_ops_rest 560 "${pytest[@]}" --basetemp=/tmp/pt2 "$ops" -k "not each_strategy" &
    run suite_state_cp 560 "${pytest[@]}" --basetemp=/tmp/pt3 tests/train/state_cp &
    run suite_models 560 "${pytest[@]}" --basetemp=/tmp/pt4 tests/models &
    run suite_other_files 560 "${pytest[@]}" --basetemp=/tmp/pt5 "${rest[@]}" &
    wait
    gpu_idle
    run suite_memory_alone 150 "${pytest[@]}" --basetemp=/tmp/pt6 "$memory"
}

long_context() {
    local before=$1 base
    base=$(python -c "from bench.long_context import random_base_path; print(random_base_path())")
    run long_context_base 150 python -c "from bench.long_context import ensure_random_base; from pathlib import Path; ensure_random_base(Path('$base'))"
    [[ -f $base ]] || return
    (cd "$before" && run long_context_before 280 python -m bench.long_context --lengths 4096 131072 --weights "$base")
    gpu_idle
    run long_context_this 280 python -m bench.long_context --lengths 4096 131072 --weights "$base"
    gpu_idle  # the first run came right after the base was written: run it again at 4096 to see any drift
    (cd "$before" && run long_context_before_again 120 python -m bench.long_context --lengths 4096 --weights "$base")
}

offload_pair() {
    local -a d3584=(python -m bench.seven_b_offload --gpu_gib 24 --n_layer 32 --n_embd 3584)
    run offload_d3584_acc1 200 "${d3584[@]}" --steps 3 --strategy offload
    gpu_idle
    run deepspeed_offload_d3584_acc1 260 "${d3584[@]}" --steps 3 --strategy deepspeed_stage_2_offload
    gpu_idle
    run offload_d3584_acc8 200 "${d3584[@]}" --steps 2 --accumulate 8 --strategy offload
    gpu_idle
    run deepspeed_offload_d3584_acc8 260 "${d3584[@]}" --steps 2 --accumulate 8 --strategy deepspeed_stage_2_offload
}

throughput() {
    local original=$1
    (cd "$original" && run original_fwd_bwd 200 env RWKV_T_MAX=4096 RWKV_FLOAT_MODE=bf16 RWKV_JIT_ON=0 \
        RWKV_MY_TESTING= SIDE_MODELS=L24-D1024-B4,L24-D2048-B2 python3 original_fwd_bwd.py floor model)
    gpu_idle
    run train_throughput 400 python -m bench.train_throughput --shapes L24-D1024 L24-D2048 \
        --strategies auto deepspeed_stage_2
}

while (( $# )); do
    stage=$1; shift
    gpu_idle
    case $stage in
        suite) suite ;;
        long_context) long_context "$(cd "$1" && pwd)"; shift ;;
        offload_7b) run offload_7b 420 python -m bench.seven_b_offload --gpu_gib 24 --steps 3 --strategy offload ;;
        offload_pair) offload_pair ;;
        rwkv7_speed) run rwkv7_speed 400 python -m bench.rwkv7_speed ;;
        x070_long_context) run x070_long_context 300 python -m bench.long_context --model x070 --n_layer 32 \
                               --n_embd 2560 --lengths 4096 131072 ;;
        wkv7) run wkv7 200 python -m bench.wkv7 ;;
        throughput) throughput "$(cd "$1" && pwd)"; shift ;;
    esac
done
cat "$summary"
