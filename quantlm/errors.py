"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QuantlmError(ValueError):
    """A problem with the user's input, stated with the fix. Never a bug in quantlm."""
