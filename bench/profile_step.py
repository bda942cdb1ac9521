"""Where a train.py step spends its GPU time and memory: phases from CUDA events, kernels from torch.profiler,
and the tensors alive at the step's memory peak.

Runs one real training (train.py's flags of bench.train_throughput or bench.long_context, no weights written)
with these watchers:
- steps: every optimizer step's time, timed as bench.train_throughput times them (bench/common.py StepTimes: CUDA
  events after consecutive optimizer steps, nothing waiting for the GPU), on the same steps: --warmup steps of
  warm-up (default WARMUP_STEPS, 2), then --timed_steps timed (default TIMED_STEPS, 12), whose median is the
  headline ms per step and tokens/s; the profiled and memory-recorded steps come after them, printed, not timed.
  Every step's time is printed, with the mean and any timed step over 1.5x the median (index, period);
- phases: CUDA events at Lightning's hooks split each of the timed steps into forward (training_step: the model,
  the loss, and under --state_cp the whole segment forward), backward (DeepSpeed's gradient hooks and bucket
  reductions included), optimizer (gradient clipping, the optimizer step, DeepSpeed's copies back into the
  16-bit weights) and between steps (data loader, Lightning, our callbacks); each phase's median over the timed
  steps, its share of the median step, and host milliseconds per phase (where the CPU, not the GPU, waits);
- kernels: torch.profiler over --profile_steps steps, a table of the operators by GPU time and one by CPU time;
- memory (--memory): the CUDA allocator's history over one step (--memory_step; 0 is the first, where optimizer
  state is created), replayed to its peak; the live allocations at the peak grouped by the line of this repository
  that made them.

    python -m bench.profile_step --out prof throughput L24-D1024 deepspeed_stage_2
    python -m bench.profile_step --out prof --memory long_context 8192 --weights /tmp/rwkv-7b-random-bf16.pth
"""
import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from bench import long_context, train_throughput
from bench.common import TIMED_STEPS, WARMUP_STEPS, StepTimes, cap_gpu_memory, peak_gib

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("forward", "backward", "optimizer", "between steps")


class PhaseTimer(pl.Callback):
    """CUDA events (and host clocks) at the hooks that bound each phase of every optimizer step."""

    def __init__(self):
        self.marks = []  # per step: {hook: (cuda event, host seconds)}

    def _mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if name == "start":
            self.marks.append({})
        self.marks[-1][name] = (event, time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark("start")

    def on_before_backward(self, trainer, pl_module, loss):
        self._mark("forward")

    def on_after_backward(self, trainer, pl_module):
        self._mark("backward")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark("end")

    def table(self, first: int, end: int) -> dict:
        """{phase: (median GPU ms, median host ms)} over the steps first..end-1 (and the start of step end)."""
        torch.cuda.synchronize()
        steps = [m for m in self.marks[first:end + 1] if {"start", "forward", "backward", "end"} <= set(m)]
        gpu, host = collections.defaultdict(list), collections.defaultdict(list)
        bounds = (("forward", "start", "forward"), ("backward", "forward", "backward"),
                  ("optimizer", "backward", "end"))
        for i, marks in enumerate(steps[:end - first]):
            for phase, a, b in bounds:
                gpu[phase].append(marks[a][0].elapsed_time(marks[b][0]))
                host[phase].append(1000 * (marks[b][1] - marks[a][1]))
            if i + 1 < len(steps):
                following = steps[i + 1]["start"]
                gpu["between steps"].append(marks["end"][0].elapsed_time(following[0]))
                host["between steps"].append(1000 * (following[1] - marks["end"][1]))
        return {phase: (statistics.median(gpu[phase]), statistics.median(host[phase]))
                for phase in PHASES if gpu[phase]}


class KernelProfile(pl.Callback):
    """torch.profiler over `steps` optimizer steps starting after `first`; tables written into `out`."""

    def __init__(self, first: int, steps: int, out: Path):
        self.first, self.last, self.out = first, first + steps, out
        self.profiler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is not None and trainer.global_step == self.last:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            (self.out / "kernels_by_gpu_time.txt").write_text(
                averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))
            (self.out / "ops_by_cpu_time.txt").write_text(
                averages.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=70))
            self.profiler = None


class MemoryPeak(pl.Callback):
    """The allocator's history over optimizer step `step`, replayed to its peak: what is alive there."""

    def __init__(self, step: int, out: Path):
        self.step, self.out = step, out
        self.recording = False
        self.baseline = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.recording:
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000)
            self.recording = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.recording and trainer.global_step == self.step + 1:
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False
            (self.out / "memory_at_peak.txt").write_text(peak_report(snapshot, self.baseline))


def _origin(frames: list) -> str:
    """The innermost frame in this repository's code (not in a library), as 'file:line function'."""
    for frame in frames:
        name = frame.get("filename", "")
        if str(ROOT) in name and "/.venv/" not in name and "/site-packages/" not in name:
            return f"{Path(name).relative_to(ROOT)}:{frame.get('line')} {frame.get('name')}"
    return frames[0].get("filename", "?").rsplit("/", 2)[-1] + " (library)" if frames else "?"


def peak_report(snapshot: dict, baseline: int) -> str:
    """Replay the recorded allocations and frees: the peak above `baseline` and what is alive at it, by origin."""
    trace = snapshot["device_traces"][0]
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] in ("free_requested", "free") and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, at_peak = total, dict(live)
    by_origin = collections.Counter()
    for event in at_peak.values():
        by_origin[_origin(event.get("frames", []))] += event["size"]
    lines = [f"allocated before the step: {baseline / 2**30:.2f} GiB; the step's peak adds {peak / 2**30:.2f} GiB "
             f"(peak {(baseline + peak) / 2**30:.2f} GiB); alive at that peak, by origin:"]
    lines += [f"{size / 2**20:10.1f} MiB  {origin}" for origin, size in by_origin.most_common(40)]
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the tables")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="optimizer steps before the timed ones")
    parser.add_argument("--timed_steps", type=int, default=TIMED_STEPS, help="optimizer steps timed")
    parser.add_argument("--profile_steps", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="record the allocator history of one step")
    parser.add_argument("--memory_step", type=int, help="the optimizer step --memory records (default: the one "
                        "after the profiled steps)")
    parser.add_argument("--gpu_gib", type=float, default=0, help="cap the card to this many GiB (0: no cap)")
    parser.add_argument("--compile", type=int, default=1, choices=(0, 1), help="train.py's --compile")
    parser.add_argument("--weights", default="", help="long_context: the 7B base .pth (default: random, made once)")
    parser.add_argument("workload", choices=("throughput", "long_context"))
    parser.add_argument("what", nargs="+", help="throughput: SHAPE STRATEGY; long_context: CTX_LEN")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_arguments()

    import train
    from src.config import parse_args

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proj_dir = Path(tempfile.mkdtemp(prefix="profile-"))
    timed = args.timed_steps  # before the profiler and the memory recording, which slow the steps they watch
    steps = args.warmup + timed + args.profile_steps + 3
    if args.workload == "throughput":
        shape, strategy = args.what
        tokens = train_throughput.random_tokens(shape, proj_dir)
        flags = train_throughput.train_flags(shape, strategy, tokens, proj_dir, steps, compile=args.compile)
        tokens_per_step = train_throughput.CTX * train_throughput.SHAPES[shape][2]
    else:
        ctx_len = int(args.what[0])
        weights = long_context.ensure_random_base(Path(args.weights or long_context.random_base_path()))
        torch.cuda.empty_cache()
        flags = long_context.lora_flags(weights, long_context.random_tokens(ctx_len, proj_dir), proj_dir, ctx_len,
                                        steps) + ["--compile", str(args.compile)]
        tokens_per_step = ctx_len
    filler = cap_gpu_memory(args.gpu_gib) if args.gpu_gib else 0  # after the base is made: that needs the whole card
    step_times, phases = StepTimes(), PhaseTimer()
    watchers = [step_times, phases, KernelProfile(args.warmup + timed, args.profile_steps, out)]
    if args.memory:
        default_step = args.warmup + timed + args.profile_steps + 1
        watchers.append(MemoryPeak(default_step if args.memory_step is None else args.memory_step, out))
    code = train.train(parse_args(flags), watchers, write_weights=False)
    table = phases.table(args.warmup, args.warmup + timed)
    step_report = step_times.report(args.warmup, timed)
    step_ms = 1000 * step_report.median
    allocated, reserved = peak_gib(filler)
    lines = [f"{' '.join(args.what)} ({args.workload}, --compile {args.compile}): exit {code}; "
             f"{torch.cuda.get_device_name(0)}; median of {timed} steps after {args.warmup}: {step_ms:.1f} ms per "
             f"step, {tokens_per_step / step_ms * 1000:,.0f} tokens/s; peak allocated / reserved {allocated:.2f} / "
             f"{reserved:.2f} GiB", *step_report.lines(), "", "| phase | GPU ms | share | host ms |",
             "|---|---|---|---|"]
    lines += [f"| {phase} | {gpu:.1f} | {gpu / step_ms:.0%} | {host:.1f} |" for phase, (gpu, host) in table.items()]
    report = "\n".join(lines)
    (out / "phases.md").write_text(report + "\n")
    (out / "phases.json").write_text(json.dumps({"table": table, "steps": step_report.as_dict(),
                                                 "peak_gib": [allocated, reserved]}))
    print(report, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
