"""Errors that mean "the input is wrong", as opposed to bugs."""


class UserError(Exception):
    """A problem with what the user asked for. The CLI prints it as one line and exits with code 2.

    The message names the problem and the fix; it never needs a traceback to be understood.
    """
