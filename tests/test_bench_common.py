"""bench/common.py on the CPU: the host-memory sampler, what a benchmark's host-memory figures come from, and the step
report, which steps of a train.py run bench.train_throughput and bench.profile_step time and what they print."""
import re
import subprocess
import sys

import pytest

from bench.common import GIB, TIMED_STEPS, WARMUP_STEPS, HostMemorySampler, StepReport

# a parent holding 300 MiB that starts a helper holding 200 MiB, both written so the pages are resident
PARENT = """
import subprocess, sys, time
held = bytearray(300 * 2**20)
helper = subprocess.Popen([sys.executable, "-c", "import time; held = bytearray(200 * 2**20); time.sleep(2.5)"])
time.sleep(2.5)
helper.wait()
"""


def test_the_sampler_separates_the_training_process_from_its_helpers():
    process = subprocess.Popen([sys.executable, "-c", PARENT])
    with HostMemorySampler(process.pid, interval=0.1) as host:
        process.wait()
    peak_mib = {key: value * 1024 / GIB for key, value in host.peak.items()}
    assert 200 <= peak_mib["helpers_pss"] < 300  # the helper alone
    assert peak_mib["pss"] >= 500 and peak_mib["rss"] >= peak_mib["pss"]
    assert max(helpers for _, _, helpers in host.timeline) == 1
    # each point: GiB the machine uses | the training process + its helper (count)
    assert re.search(r"t=\d+s [\d.]+ \| 0\.3 \+ 0\.2 \(1\)(, |$)", host.timeline_text(every=0.1))


def test_the_breakdown_finds_where_a_process_holds_its_memory():
    holder = "import time; held = bytearray(300 * 2**20); print('held', flush=True); time.sleep(1)"
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"  # sampled from the first sample on, while it holds them
    with HostMemorySampler(process.pid, interval=0.1) as host:
        process.wait()
    assert host.breakdown_at > 0
    kind, size = next(iter(host.peak_breakdown.items()))  # the largest first
    assert kind == "anonymous, private" and 300 * 2**20 <= size < 400 * 2**20
    assert host.breakdown_text().startswith(f"at {host.breakdown_at / GIB:.1f} GiB in use: anonymous, private 0.")


def test_every_step_is_printed_and_a_slow_step_every_four_is_found():
    """2 warm-up steps, 12 timed ones of which every fourth takes three times as long, 2 profiled steps after them."""
    timed = [0.3 if i % 4 == 0 else 0.1 for i in range(2, 14)]
    report = StepReport((5.0, 1.2, *timed, 0.9, 0.8), warmup=2, timed=12)
    assert list(report.timed_steps) == list(range(2, 14))
    assert report.median == pytest.approx(0.1) and report.mean == pytest.approx(0.15)
    assert report.slow == [4, 8, 12] and report.period == 4
    every, summary = report.lines()
    assert every == ("step ms, 2 warm-up: 5000.0 1200.0 | 12 timed: 100.0 100.0 300.0 100.0 100.0 100.0 300.0 100.0 "
                     "100.0 100.0 300.0 100.0 | 2 after: 900.0 800.0")
    assert summary == ("timed steps 2-13: median 100.0 ms, mean 150.0 ms; slow (over 1.5x the median): step 4 (3.0x), "
                       "step 8 (3.0x), step 12 (3.0x), every 4 steps")


def test_slow_steps_without_a_period_and_no_slow_step():
    irregular = StepReport((1.0, 1.0, 0.1, 0.2, 0.1, 0.1, 0.2, 0.2, 0.1, 0.1), warmup=2, timed=None)
    assert irregular.slow == [3, 6, 7] and irregular.period is None
    assert irregular.lines()[1].endswith("step 3 (2.0x), step 6 (2.0x), step 7 (2.0x)")
    steady = StepReport((2.0, 0.1, 0.11, 0.1, 0.12), warmup=1, timed=None)
    assert steady.slow == [] and steady.lines()[1] == ("timed steps 1-4: median 105.0 ms, mean 107.5 ms; no step over "
                                                       "1.5x the median")
    assert StepReport((0.1, 0.5, 0.1), warmup=0, timed=None).period is None  # one slow step has no period


def test_a_run_shorter_than_its_warm_up_times_all_its_steps():
    report = StepReport((3.0, 1.0), warmup=2, timed=12)
    assert list(report.timed_steps) == [0, 1] and report.median == 2.0
    assert report.lines()[0] == "step ms, 2 timed: 3000.0 1000.0"
    assert StepReport(**report.as_dict()) == report  # the RESULT line's form reads back


def test_both_step_benchmarks_time_the_same_steps():
    """bench.train_throughput trains the warm-up and the timed steps; bench.profile_step's defaults are the same."""
    import inspect

    from bench import profile_step, train_throughput

    assert inspect.signature(train_throughput.train_flags).parameters["steps"].default == WARMUP_STEPS + TIMED_STEPS
    args = profile_step.parse_arguments(["--out", "prof", "throughput", "L24-D1024", "deepspeed_stage_2"])
    assert (args.warmup, args.timed_steps) == (WARMUP_STEPS, TIMED_STEPS)
