"""Helpers shared by the command lines: one-line warnings and errors."""
import argparse
import warnings

from .errors import UserError


def one_line_warnings() -> None:
    """Print warnings as 'warning: message' instead of a file/line dump."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line `UserError` (exit 2 through exit_on_user_error)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
