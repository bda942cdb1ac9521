"""Ctrl+C / SIGTERM with several processes (DDP on two CPU processes, gloo): the ranks agree on the stop one
optimizer step late without waiting for it, stop at the same step, save once, and the stopped run resumes exactly."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from src.io.checkpoint import load_weights
from src.io.outputs import BUNDLE_NAME

# StopAgreement on a real two-process gloo group, with a fake trainer: rank 1 gets a SIGTERM during step 3. Every
# all_reduce is recorded (launched async or not, at which boundary its work was waited for); the JSON line printed
# holds each boundary's answer and those records.
AGREEMENT = """
import json, signal, sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from src.train.stopping import StopAgreement

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
boundary, launched, real_all_reduce = 0, [], dist.all_reduce


class Watched:
    def __init__(self, work, record):
        self.work, self.record = work, record

    def wait(self):
        self.record["waited_at"] = boundary
        return self.work.wait()


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    record = {"at": boundary, "async": async_op, "waited_at": None if async_op else boundary}
    launched.append(record)
    work = real_all_reduce(tensor, op=op, group=group, async_op=async_op)
    return Watched(work, record) if async_op else work


dist.all_reduce = all_reduce
trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
agreement, answers = StopAgreement(), []
for boundary in range(1, 7):
    local = signal.SIGTERM if rank == 1 and boundary >= 3 else None
    answers.append(agreement.signal(trainer, local))
    if answers[-1]:
        break
dist.barrier()
print(json.dumps({"answers": answers, "launched": launched}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_ranks_agree_one_step_late_without_waiting():
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", AGREEMENT, str(rank), port], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    results = []
    for proc in ranks:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        # the signal of step 3 reaches every rank at the boundary after step 4, and no boundary before
        assert result["answers"] == [0, 0, 0, signal.SIGTERM]
        launched = result["launched"]
        assert [r["at"] for r in launched] == [1, 2, 3], "one all-reduce per boundary, none once the stop is agreed"
        assert all(r["async"] for r in launched), "a blocking all-reduce makes every step wait for the slowest rank"
        # each all-reduce is read at the next boundary, after a whole step: never at the boundary that launched it
        assert [r["waited_at"] for r in launched] == [2, 3, 4]


def test_one_process_stops_at_the_next_boundary_without_a_collective(monkeypatch):
    from types import SimpleNamespace

    from src.train.stopping import StopAgreement

    def forbidden(*args, **kwargs):
        raise AssertionError("one process needs no collective")

    monkeypatch.setattr(torch.distributed, "all_reduce", forbidden)
    one = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    agreement = StopAgreement()
    assert [agreement.signal(one, signum) for signum in (None, None, signal.SIGINT)] == [0, 0, signal.SIGINT]


# ---- train.py on two CPU processes (DDP over gloo): 3 mini-epochs of 30 optimizer steps; fp32 on CPU is exact
RUN = ["--data_type", "dummy", "--n_layer", "2", "--n_embd", "32", "--ctx_len", "32", "--micro_bsz", "4",
       "--epoch_steps", "30", "--epoch_count", "3", "--epoch_save", "1", "--lr_init", "2e-3", "--lr_final", "5e-4",
       "--random_seed", "5", "--wkv_backend", "torch", "--enable_progress_bar", "0",
       "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def run(proj_dir, *extra, timeout=300):
    """train.py on two processes to its end: (exit code, output)."""
    result = subprocess.run([sys.executable, "train.py", *RUN, "--proj_dir", str(proj_dir), *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def step_rows(proj_dir):
    return (proj_dir / "train_steps.tsv").read_text().splitlines()[1:]


def rank_1_pid(rank_0: subprocess.Popen) -> int:
    """Lightning starts rank 1 as a child process of rank 0 (which runs the command itself)."""
    children = []
    for task in Path(f"/proc/{rank_0.pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    assert len(children) == 1, children
    return children[0]


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory):
    proj_dir = tmp_path_factory.mktemp("straight2")
    code, output = run(proj_dir)
    assert code == 0, output[-3000:]
    return proj_dir


@pytest.mark.parametrize("whom, signum", [("both", signal.SIGINT), ("rank 1", signal.SIGTERM)])
def test_two_ranks_stop_at_the_same_step_save_once_and_resume_exactly(straight_two_ranks, tmp_path, whom, signum):
    """Ctrl+C reaches both processes of the group; a SIGTERM to rank 1 alone stops rank 0 too (exit 143 from it)."""
    proj_dir = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", *RUN, "--proj_dir", str(proj_dir)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((proj_dir / "train_steps.tsv").exists() and step_rows(proj_dir)):  # 20 steps on both ranks
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.01)
    if whom == "both":
        os.killpg(proc.pid, signum)
    else:
        os.kill(rank_1_pid(proc), signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output and "the processes agree on the stop" in output
    stops = [line for line in output.splitlines() if line.startswith("Stopped after optimizer step")]
    assert len(stops) == 1, output[-3000:]  # rank 0 reports it once
    stopped_at = int(stops[0].split()[4].rstrip("."))
    assert 20 <= stopped_at < 90 and len(step_rows(proj_dir)) == stopped_at
    last = load_weights(proj_dir / "rwkv-last.pth")
    assert set(last) == set(load_weights(straight_two_ranks / "rwkv-final.pth"))
    assert (proj_dir / BUNDLE_NAME).is_file()
    assert not [p.name for p in proj_dir.iterdir() if p.name.startswith(".")]  # no temporary files left

    code, output = run(proj_dir, "--resume", str(proj_dir / BUNDLE_NAME))
    assert code == 0, output[-3000:]
    assert [row.split("\t")[:4] for row in step_rows(proj_dir)] == \
        [row.split("\t")[:4] for row in step_rows(straight_two_ranks)]  # step, epoch, loss, lr
    resumed, straight = load_weights(proj_dir / "rwkv-final.pth"), load_weights(straight_two_ranks / "rwkv-final.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
