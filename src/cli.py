"""What every command line of the toolkit shares: a parser whose usage errors are one line, and help that
states a flag's default only where it informs.

Exit codes of every CLI: 0 done (and --help), 2 bad input (a usage error here, or a UserInputError later),
128 + the signal number when Ctrl+C or SIGTERM stopped it (130, 143). Every entry point's main() runs its work
through run_main, which reports a UserInputError, and an Interrupted where the command stops on signals, in one line
on stderr with its exit code. A second Ctrl+C or SIGTERM while the first one's stop is under way quits at once
(quit_at_once), still leaving nothing half-written.
"""
import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
from typing import Callable, Optional

from src.errors import UserInputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad command line prints one line, `PROG: error: MESSAGE (see PROG
    --help)`, and exits with code 2, instead of printing the whole usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class FlagHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" once, and only where it informs: not when the help text already describes the
    default, and not for None, "" or False, whose meaning (the flag left out) the help text gives."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        uninformative = default is None or default is False or default == "" or default == argparse.SUPPRESS
        if uninformative or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class Interrupted(BaseException):
    """Ctrl+C or SIGTERM, where a command stops at once. Like KeyboardInterrupt it passes every `except Exception`,
    so `finally` blocks and the discards of atomic writes run; unlike it, Lightning re-raises it (on a
    KeyboardInterrupt Lightning exits the process itself). The exit code is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# What runs when a command ends, however it ends: src/io/atomic.py registers the deletion of the temporary files still
# in flight, src/io/run_lock.py the release of the locks this process holds.
_AT_THE_END: list = []


def at_the_end(cleanup: Callable[[], None]) -> None:
    """Have `cleanup` run when a command ends: after its work, whatever ended it (run_main; a signal may land before a
    writer had the chance to note what it must delete), and when a second signal quits it at once (quit_at_once)."""
    if cleanup not in _AT_THE_END:
        _AT_THE_END.append(cleanup)


def _clean_up() -> None:
    for cleanup in _AT_THE_END:
        cleanup()


def quit_at_once(signum: int) -> None:
    """A second Ctrl+C or SIGTERM while the first one's stop is under way: one line, the cleanups registered with
    at_the_end (temporary files deleted, locks released), the worker processes this process started ended (a pool's
    workers would wait for work for ever), then os._exit(128 + signum). No `finally` block runs."""
    print(f"\n{signal.Signals(signum).name} again: quitting at once; files already written are whole.",
          file=sys.stderr, flush=True)
    _clean_up()
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(128 + signum)


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, Ctrl+C and SIGTERM raise Interrupted. Without it SIGTERM ends the process on the spot,
    leaving temporary files behind. A second signal while the first one's Interrupted unwinds quits the process at
    once (quit_at_once), never leaving a temporary file. The handlers from before are restored afterwards."""
    pid, received = os.getpid(), []

    def interrupt(signum, frame):
        if received and os.getpid() == pid:  # a forked child is its parent's to stop
            quit_at_once(signum)
        received.append(signum)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_main(prog: str, body: Callable[[], int], interrupted: Optional[str] = None) -> int:
    """The exit code of an entry point whose work is `body()`, which returns its exit code (a usage error and
    --help leave through SystemExit, as argparse does). A UserInputError ends it with the one line
    `PROG: error: MESSAGE` on stderr and exit code 2.

    `interrupted`, for a body that stops on Ctrl+C and SIGTERM (it runs its work in signals_interrupt()), is the
    line an Interrupted ends it with, on stderr: a format string of `prog` and `signal` (SIGINT, SIGTERM), e.g.
    "{prog}: {signal}: stopped; nothing was written"; the exit code is then 128 + the signal number. A
    KeyboardInterrupt (raised by other code than the handler of signals_interrupt) counts as a SIGINT. Without it an
    Interrupted passes on."""
    try:
        return body()
    except UserInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        if interrupted is None:
            raise
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(interrupted.format(prog=prog, signal=signal.Signals(signum).name), file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        _clean_up()


def exit_process(code: int) -> None:
    """The end of an entry point run as a program (`cli.exit_process(main())`): its outcome is reported,
    so a signal from now on is ignored instead of printing a traceback while the interpreter shuts down."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
