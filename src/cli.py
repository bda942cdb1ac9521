"""What every command line of the toolkit shares: a parser whose usage errors are one line, and help that
states a flag's default only where it informs.

Exit codes of every CLI: 0 done (and --help), 2 bad input (a usage error here, or a UserInputError later),
128 + the signal number when Ctrl+C or SIGTERM stopped it (130, 143).
"""
import argparse
import contextlib
import signal


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
