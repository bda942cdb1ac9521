"""bench/common.py's host-memory sampler, on the CPU: it is what a benchmark's host-memory figures come from."""
import re
import subprocess
import sys

from bench.common import GIB, HostMemorySampler

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
