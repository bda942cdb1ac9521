"""What every command line of the toolkit shares: a parser whose usage errors are one line, and help that
states a flag's default only where it informs.

Exit codes of every CLI: 0 done (and --help), 2 bad input (a usage error here, or a UserInputError later).
"""
import argparse


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
