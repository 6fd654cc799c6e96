"""Errors a user can cause. The CLI turns them into one message and an exit code."""


class LetheError(Exception):
    """Base class: the message is meant for the user, no traceback is shown."""

    exit_code = 1


class ConfigError(LetheError):
    """Bad config or input (unknown key, wrong value, missing file): exit 2."""

    exit_code = 2


class RunError(LetheError):
    """A failure during the run (e.g. non-finite loss): exit 1, run marked FAILED."""

    exit_code = 1
