"""The one error type for bad input from the caller.

Every error that a caller can fix by changing what they passed (a field, a file, a limit, a
checkpoint folder) derives from `InputError`, so the CLI and the service catch one type and
report its message as it is: the message names the field, the file and line, or the limit.
Anything else that escapes is a bug in pidec.
"""


class InputError(ValueError):
    """Bad input from the caller: names the field and the limit."""
