"""The one exception type for problems with what the user gave us.

Command lines catch `UserError`, print its message as a single line and exit with status 2
(no traceback). Everything else is a bug and keeps its traceback.
"""

import functools
import sys

# The characters str.splitlines() breaks at, each written as its escape (\n, \x85, \u2028, ...).
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """`text` with its line breaks written as escapes, so that a message quoting a user's path or
    key, which may hold one, stays on one line."""
    return text.translate(_LINE_BREAKS)


class UserError(Exception):
    """A bad input: a missing file, an unknown config key, an invalid value. The message says
    what is wrong and how to fix it, in one line."""

    def cli_message(self) -> str:
        """The message as a command line prints it: on one line, whatever it quotes."""
        return one_line(str(self))


def exit_on_user_error(main):
    """Decorate a command-line `main()` so a `UserError` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error.cli_message()}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def check_int(key: str, value, minimum: int, maximum: int | None = None) -> None:
    """Raise UserError naming config `key` unless `value` is an int with minimum <= value (<= maximum)."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise UserError(f"{key} must be an integer {allowed}, got {value!r}; change it in the config")
