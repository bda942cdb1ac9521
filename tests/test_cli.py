"""What every command line shares (src/cli.py): --help exits 0; a usage error is one line and exit code 2; a second
signal quits at once; temporary files still in flight when a command ends are deleted."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import export_hf
import import_hf
import merge_lora
import merge_lora_plus
import plot_run
import preprocess_data
import train
from conftest import ROOT
from src import cli
from src.errors import UserInputError
from src.io import atomic

CLIS = {"train.py": train, "merge_lora.py": merge_lora, "merge_lora_plus.py": merge_lora_plus,
        "preprocess_data.py": preprocess_data, "export_hf.py": export_hf, "import_hf.py": import_hf,
        "evaluate.py": evaluate, "plot_run.py": plot_run}


@pytest.mark.parametrize("prog", CLIS)
def test_help_exits_0(prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[prog].main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


@pytest.mark.parametrize("prog", CLIS)
def test_a_usage_error_is_one_line_and_exit_2(prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[prog].main(["--no_such_flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"{re.escape(prog)}: error: .+ \(see {re.escape(prog)} --help\)\n", err), err


def test_preprocess_data_names_a_bad_choice(capsys):
    with pytest.raises(SystemExit) as exit_info:
        preprocess_data.main(["--input", "x.jsonl", "--output-prefix", "out", "--tokenizer-type", "SPMTokenizer"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'SPMTokenizer'" in err and err.count("\n") == 1


# A program whose work holds a temporary file (an atomic write in flight) and whose cleanup after a signal is slow.
SLOW_CLEANUP = """
import sys, time
from src import cli
from src.io import atomic

def body():
    with cli.signals_interrupt():
        tmp = atomic.temporary_path(sys.argv[1])
        tmp.write_bytes(b"half")
        try:
            print("writing", flush=True)
            time.sleep(60)
        finally:
            try:
                print("cleaning up", flush=True)
            finally:
                time.sleep(3)  # a slow cleanup, where the second signal lands
                atomic.discard(tmp)

cli.exit_process(cli.run_main("prog.py", body, interrupted="{prog}: {signal}: stopped; nothing was written"))
"""


def test_a_second_signal_quits_at_once_and_nothing_is_left(tmp_path):
    """Ctrl+C, then Ctrl+C again while the first one's cleanup runs: the process quits at once (exit 130, one line,
    the temporary file deleted by the hard exit)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP, str(tmp_path / "out.bin")], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.stdout.readline() == "cleaning up\n"
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and list(tmp_path.iterdir()) == [], (out, err)
    assert err == "\nSIGINT again: quitting at once; files already written are whole.\n", err
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("stop", [cli.Interrupted(signal.SIGTERM), UserInputError("bad")])
def test_temporary_files_a_stop_left_in_flight_are_deleted_when_the_command_ends(tmp_path, capsys, stop):
    """A signal can land between the creation of a temporary file and the code that would delete it (a writer being
    set up): run_main deletes what is still in flight when the command ends."""
    def body():
        atomic.temporary_path(tmp_path / "out.bin").write_bytes(b"half")
        raise stop

    code = cli.run_main("prog.py", body, interrupted="{prog}: {signal}: stopped; nothing was written")
    assert code == (143 if isinstance(stop, cli.Interrupted) else 2) and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.count("\n") == 1
