"""What the GPU benchmarks share: a card made to look smaller, the step times of a real train.py run (which steps are
timed and how: StepTimes, StepReport), CUDA-event timing, the copy bandwidth and bf16 matmul rate of this card (the
hardware limits the tables compare against), peak memory without the filler, host memory of a process tree, and the
tables' header lines.
"""
import collections
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch

from src.train.stopping import completes_optimizer_step

GIB = 2 ** 30
ROOT = Path(__file__).resolve().parents[1]


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


def pinned_host_peak_gib() -> float:
    """Peak GiB of page-locked host memory this process's pinned-memory allocator held: what pin_memory() and
    pin_memory=True allocate (--state_cp's stored block inputs; DeepSpeed's offload buffers where its config asks
    for pinned memory, which Lightning's DeepSpeedStrategy does not by default). The allocator rounds blocks up to
    powers of two and keeps freed ones, so this counts pages pinned, not bytes asked for. Older torch calls those
    pages "reserved_bytes" and what it handed out "allocated_bytes"; newer torch calls the pages "allocated_bytes"."""
    stats = torch.cuda.host_memory_stats()
    return stats.get("reserved_bytes.peak", stats.get("allocated_bytes.peak", 0)) / GIB


# bench.train_throughput and bench.profile_step time the same optimizer steps of a train.py run the same way
# (StepTimes): the first WARMUP_STEPS are warm-up (torch.compile's kernels, the allocator's growth, DeepSpeed's and the
# optimizer's first allocations), the TIMED_STEPS after them are timed, and what runs after those (a profiler's steps)
# is printed, not timed. Twelve timed steps show a slow step that comes back every few steps.
WARMUP_STEPS = 2
TIMED_STEPS = 12
# a timed step this many times the median of the timed steps is reported as slow, with its index
SLOW_STEP = 1.5


class StepTimes(pl.Callback):
    """Each optimizer step's time in a train.py run, from CUDA events on the training stream: one when training
    starts, one after each optimizer step (at its on_train_batch_end). A step's time runs from the end of the previous
    step's work to the end of its own, so what runs between steps (data loader, Lightning, callbacks) counts once, and
    a host that falls behind the GPU shows as the GPU's idle time. Nothing waits for the GPU during the run: a sync
    after every step would keep the host from queuing the next step while the GPU runs this one, which the training
    itself does not do, and would slow most the steps with the most host work (DeepSpeed's)."""

    def __init__(self):
        self.events = []

    def _record(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)

    def on_train_start(self, trainer, pl_module):
        self._record()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if completes_optimizer_step(trainer, batch_idx):
            self._record()

    def seconds(self) -> list:
        """Seconds of every optimizer step so far, in order (waits for the GPU: call it after the run)."""
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:])]

    def report(self, warmup: int = WARMUP_STEPS, timed: Optional[int] = TIMED_STEPS) -> "StepReport":
        return StepReport(self.seconds(), warmup, timed)


@dataclasses.dataclass(frozen=True)
class StepReport:
    """Every optimizer step's seconds (`seconds`, step 0 first) and which are timed: those after the first `warmup`,
    `timed` of them (None: all the rest). A run shorter than its warm-up has all its steps timed."""
    seconds: tuple
    warmup: int = WARMUP_STEPS
    timed: Optional[int] = TIMED_STEPS

    def __post_init__(self):
        object.__setattr__(self, "seconds", tuple(self.seconds))  # a list from a RESULT line's JSON too

    @property
    def timed_steps(self) -> range:
        end = len(self.seconds) if self.timed is None else min(self.warmup + self.timed, len(self.seconds))
        return range(self.warmup, end) if self.warmup < end else range(len(self.seconds))

    @property
    def median(self) -> float:
        """Median seconds of the timed steps: what the tables' tokens/s come from."""
        return statistics.median(self.seconds[i] for i in self.timed_steps)

    @property
    def mean(self) -> float:
        """Mean seconds of the timed steps: what a long run sees, slow steps included."""
        return statistics.fmean(self.seconds[i] for i in self.timed_steps)

    @property
    def slow(self) -> list:
        """Indices of the timed steps that took more than SLOW_STEP times the median."""
        median = self.median
        return [i for i in self.timed_steps if self.seconds[i] > SLOW_STEP * median]

    @property
    def period(self) -> Optional[int]:
        """Steps between the slow steps when there are two or more, evenly spaced; None otherwise."""
        gaps = {b - a for a, b in zip(self.slow, self.slow[1:])}
        return gaps.pop() if len(gaps) == 1 else None

    def lines(self) -> list:
        """Two lines: every step's milliseconds (warm-up | timed | after), and the timed steps' median, mean and slow
        steps (index, times the median, and their period)."""
        steps = self.timed_steps
        parts = [("warm-up", range(steps.start)), ("timed", steps), ("after", range(steps.stop, len(self.seconds)))]
        every = " | ".join(f"{len(which)} {name}: " + " ".join(f"{1000 * self.seconds[i]:.1f}" for i in which)
                           for name, which in parts if which)
        median, slow = self.median, self.slow
        summary = (f"timed steps {steps.start}-{steps.stop - 1}: median {1000 * median:.1f} ms, mean "
                   f"{1000 * self.mean:.1f} ms; ")
        if not slow:
            summary += f"no step over {SLOW_STEP:g}x the median"
        else:
            summary += (f"slow (over {SLOW_STEP:g}x the median): "
                        + ", ".join(f"step {i} ({self.seconds[i] / median:.1f}x)" for i in slow)
                        + (f", every {self.period} steps" if self.period else ""))
        return [f"step ms, {every}", summary]

    def as_dict(self) -> dict:
        """For a RESULT line; StepReport(**d) reads it back."""
        return {"seconds": list(self.seconds), "warmup": self.warmup, "timed": self.timed}


def time_ms(fn, calls: int = 20, rounds: int = 5) -> float:
    """Mean milliseconds per call of fn(i) over `calls` back-to-back calls; the median of `rounds` rounds."""
    for i in range(3):
        fn(i)
    results = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        torch.cuda.synchronize()
        results.append(start.elapsed_time(end) / calls)
    return statistics.median(results)


def copy_bandwidth() -> float:
    """Bytes per second moved by a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), calls=10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_tflops(size: int = 8192) -> float:
    """bf16 matmul rate of this card: random size^3 products, each timed alone, the median of 10."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size ** 3 / (time_ms(lambda i: a @ b, calls=1, rounds=10) * 1e-3) / 1e12


def _meminfo() -> dict:
    with open("/proc/meminfo", encoding="ascii") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}


def _process_tree(pid: int) -> list:
    """pid and all its descendants (compiler processes, anything forked), read from /proc."""
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                frontier += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return tree


def _process_memory(pid: int) -> tuple:
    """(RSS, PSS) bytes of one process: PSS shares pages between the processes that map them, so the PSS of a tree
    is what it holds (the RSS of forked workers counts their parent's pages again). Pinned pages are in both; how
    many there are, the process itself reports (pinned_host_peak_gib): /proc's VmPin and VmLck count memory locked
    by mlock and by some drivers, not necessarily what the CUDA driver pins."""
    try:
        rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except OSError:
        return 0, 0
    kib = lambda key: int(rollup.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("Rss"), kib("Pss")


def _mapping_kind(header: str) -> str:
    """A /proc/PID/smaps mapping header -> the kind of memory it is: the file it maps (libraries together), the
    CUDA driver's mappings (/dev/nvidia*), or anonymous memory, private or shared."""
    fields = header.split(maxsplit=5)
    path = fields[5].strip() if len(fields) > 5 else ""
    shared = fields[1][3] == "s"
    if path.startswith("/dev/nvidia"):
        return "CUDA driver mappings"
    if ".so" in path:
        return "libraries (.so)"
    if not path or path in ("[heap]", "[stack]") or path.startswith("[anon"):
        return f"anonymous, {'shared' if shared else 'private'}"
    return f"{path} ({'shared' if shared else 'private'})"


def mapping_breakdown(pids: list) -> dict:
    """{kind of memory: PSS bytes} summed over the processes' mappings (/proc/PID/smaps), largest first."""
    totals = collections.Counter()
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
        except OSError:
            continue
        kind = None
        for line in lines:
            key = line.split(maxsplit=1)[0]
            if not key.endswith(":"):  # a mapping's header, "start-end perms offset device inode path"
                kind = _mapping_kind(line)
            elif key == "Pss:":
                totals[kind] += int(line.split()[1]) * 1024
    return dict(totals.most_common())


class HostMemorySampler:
    """Samples, every `interval` seconds on a thread, the host memory of a process tree (RSS, PSS), the
    PSS of the root's helper processes (its descendants: compiler workers and build processes) apart,
    and the machine's use (MemTotal - MemAvailable); keeps the peaks, a timeline, and where the memory was by kind
    (mapping_breakdown) when the machine's use last rose to a new high by a GiB: a run the kernel kills leaves the
    breakdown of its last second or so."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peak = {"rss": 0, "pss": 0, "helpers_pss": 0, "machine_used": 0}
        self.timeline = []  # (seconds since start, {the sample's keys: GiB}, helper processes)
        self.peak_breakdown, self.breakdown_at = {}, 0  # mapping_breakdown, and the machine's use it was taken at
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.interval):
            sample = dict.fromkeys(self.peak, 0)
            tree = _process_tree(self.pid)
            for pid in tree:
                rss, pss = _process_memory(pid)
                sample["rss"] += rss
                sample["pss"] += pss
                if pid != self.pid:
                    sample["helpers_pss"] += pss
            info = _meminfo()
            sample["machine_used"] = info["MemTotal"] - info["MemAvailable"]
            self.peak = {k: max(self.peak[k], sample[k]) for k in self.peak}
            if sample["machine_used"] >= self.breakdown_at + GIB:
                self.peak_breakdown, self.breakdown_at = mapping_breakdown(tree), sample["machine_used"]
            self.timeline.append((time.time() - self.started, {k: v / GIB for k, v in sample.items()}, len(tree) - 1))

    def timeline_text(self, every: float = 5.0) -> str:
        """'t=5s 12.3 | 10.1 + 0.4 (16), ...' one point per `every` seconds: GiB the machine uses | PSS of the
        training process + of its helper processes (how many)."""
        points, next_time = [], 0.0
        for t, gib, helpers in self.timeline:
            if t >= next_time:
                points.append(f"t={t:.0f}s {gib['machine_used']:.1f} | {gib['pss'] - gib['helpers_pss']:.1f} + "
                              f"{gib['helpers_pss']:.1f} ({helpers})")
                next_time = t + every
        return ", ".join(points)

    def breakdown_text(self, top: int = 8) -> str:
        """'at 90.0 GiB in use: anonymous, private 84.9, libraries (.so) 0.5, ...': the `top` largest kinds of the
        last breakdown, PSS GiB, and the machine's use when it was taken."""
        kinds = ", ".join(f"{kind} {size / GIB:.1f}" for kind, size in list(self.peak_breakdown.items())[:top])
        return f"at {self.breakdown_at / GIB:.1f} GiB in use: {kinds}"


def print_run_header(module: str, argv, card_details: bool = False) -> None:
    """A bench table's first lines: the card (with its SM count and L2 size if `card_details`), torch and CUDA,
    the time in UTC, and the command that printed it (`argv` None: this process's own arguments)."""
    props = torch.cuda.get_device_properties(0)
    card = props.name + (f", {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB"
                         if card_details else "")
    print(f"{card}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python -m {module} {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())


def run_child(module: str, argv: list, label: str):
    """`python -m module *argv` from the repository root in a process of its own (a card capped, DeepSpeed set up
    once per process): its RESULT line as a dict, printed; None (and the end of its output) when it failed."""
    child = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True)
    found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not found:
        print(f"{label}: exit {child.returncode}\n{(child.stdout + child.stderr)[-3000:]}", flush=True)
        return None
    print(found[0], flush=True)
    return json.loads(found[0][len("RESULT "):])
