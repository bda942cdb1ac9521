"""What every command line of the toolkit shares: a parser whose usage errors are one line, and help that
states a flag's default only where it informs.

Exit codes of every CLI: 0 done (and --help), 2 bad input (a usage error here, or a UserInputError later),
128 + the signal number when Ctrl+C or SIGTERM stopped it (130, 143). Every entry point's main() runs its work
through run_main, which reports a UserInputError, and an Interrupted where the command stops on signals, in one line
on stderr with its exit code.
"""
import argparse
import contextlib
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


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, Ctrl+C and SIGTERM raise Interrupted. Without it SIGTERM ends the process on the spot,
    leaving temporary files behind. The handlers from before are restored afterwards."""
    def interrupt(signum, frame):
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
    "{prog}: {signal}: stopped; nothing was written"; the exit code is then 128 + the signal number. Without it an
    Interrupted passes on."""
    try:
        return body()
    except UserInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if interrupted is None:
            raise
        print(interrupted.format(prog=prog, signal=e), file=sys.stderr)
        return 128 + e.signum
