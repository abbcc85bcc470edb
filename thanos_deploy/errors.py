"""Errors that mean "the input is wrong", as opposed to bugs."""


class UserError(Exception):
    """A problem with what the user asked for. The CLI prints it as one line and exits with code 2.

    The message names the problem and the fix; it never needs a traceback to be understood.
    """


class PeerLost(UserError):
    """A collective of a run of several processes failed: another process stopped (killed, or
    failed before it could say why). Its finished layers are kept, as after a kill."""


def at_least(minimum: int, **values: int) -> None:
    """Counts given on the command line (window lengths, token budgets) must be at least `minimum`."""
    for name, value in values.items():
        if value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}: pass a larger value")
