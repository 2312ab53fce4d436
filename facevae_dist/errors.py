"""User-facing errors. The CLI prints these as one line; anything else is a bug and gets a traceback."""


class FaceVAEError(Exception):
    """A problem the user can fix (bad input, missing file, wrong layout). Exit code 1 by default."""

    exit_code = 1


class UsageError(FaceVAEError):
    """Bad command-line usage or configuration: exit code 2."""

    exit_code = 2


class DataError(FaceVAEError):
    """Input data is missing, malformed or inconsistent: exit code 2 (the user must fix the input)."""

    exit_code = 2


class RunError(FaceVAEError):
    """A run failed at run time (non-finite loss, corrupt checkpoint, ...): exit code 1."""

    exit_code = 1
