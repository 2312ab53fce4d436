"""User-facing errors. The CLI prints these as one line; so it does an OSError (from_os_error: a full disk, a
read-only folder, a path through a file); anything else is a bug and gets a traceback."""

import errno
import os


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


class Stopped(FaceVAEError):
    """Stopped by a signal at a point with nothing to save (e.g. while decoding the cache): one line, and the exit
    code a shell gives a process killed by that signal (128 + its number: 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# What to do about the OS errors a command meets on its files; the rest get a generic hint.
_OS_HINTS = {
    "ENOSPC": "the disk is full: free space there or write elsewhere",
    "EDQUOT": "the disk quota is used up: free space there or write elsewhere",
    "EFBIG": "the file is over a size limit (ulimit -f, or the file system's): free space or write elsewhere",
    "EROFS": "a read-only file system: write elsewhere",
    "EACCES": "permission denied: choose a path you may write to (or read)",
    "EPERM": "not permitted: choose a path you may write to (or read)",
    "ENOTDIR": "a part of the path is a file, not a folder: choose another path",
    "EISDIR": "a folder where a file is expected: name a file",
    "ENOENT": "no such file or folder: check the path",
    "EEXIST": "already exists: remove it or choose another path",
    "ENAMETOOLONG": "the name is too long for the file system: choose a shorter path",
    "EIO": "an input/output error: check the disk",
}
# Errors of the machine, not of the path the user chose: a run-time failure (exit 1) wherever they happen.
_RESOURCE_ERRNOS = ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "ENOMEM")


def _inside(path: str, roots: list[str]) -> bool:
    path = os.path.abspath(path)
    for root in roots:
        root = os.path.abspath(root)
        if path == root or path.startswith(root + os.sep) or root.startswith(path + os.sep):
            return True
    return False


def from_os_error(exc: OSError, user_paths=()) -> FaceVAEError:
    """An OSError as one line `<path>: <strerror> (<hint>)`: a UsageError (exit 2) when the path is one the user
    gave (or inside it, or a folder above it) and the error is about that path, else a RunError (exit 1): a full
    disk or an I/O error is the machine's problem, not the command line's."""
    name = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(name, "check the path and its file system")
    where = exc.filename if exc.filename is not None else None
    if name == "EEXIST" and where is not None and os.path.exists(where) and not os.path.isdir(where):
        reason, hint = "is a file", "a folder is needed there: choose another path"  # mkdir(exist_ok) on a file
    text = f"{os.fsdecode(where)}: {reason} ({hint})" if where is not None else f"{reason} ({hint})"
    if exc.filename2 is not None:
        text = f"{os.fsdecode(where)} -> {os.fsdecode(exc.filename2)}: {reason} ({hint})"
    user = where is not None and name not in _RESOURCE_ERRNOS and _inside(os.fsdecode(where), list(user_paths))
    return (UsageError if user else RunError)(text)
