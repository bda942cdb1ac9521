"""bench/gpu_session.sh refuses a mistyped stage or a missing folder before it creates anything or asks for the GPU:
on the device, a typo found after minutes of tests would cost device time."""
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.parametrize("stages, message", [
    (["suite", "sweet"], "unknown stage: sweet"),
    (["long_context"], "long_context needs a folder: got ''"),
    (["throughput", "no-such-folder", "suite"], "throughput needs a folder: got 'no-such-folder'"),
])
def test_a_wrong_stage_is_refused_before_anything_runs(tmp_path, stages, message):
    logs = tmp_path / "logs"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), str(logs), "60", *stages],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stdout == "" and not logs.exists()
