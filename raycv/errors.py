"""User-facing errors: the CLI prints these as one line and exits with status 2."""

import errno
import re


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a checkpoint, a dataset."""


class ConfigError(UserError):
    """A config key, type or value that cannot work."""


_REMOTE_USER_ERROR = re.compile(r"raycv\.errors\.(?:UserError|ConfigError): ([^\n]+)")


def _chain(exc: BaseException):
    """Every exception behind `exc`, once each: causes, contexts, Ray's wrapped `cause`, and Ray
    Train's per-worker failures."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(v for v in failures.values() if isinstance(v, BaseException))


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind an exception that crossed Ray (task, actor and Train worker errors
    wrap the original), or None. Lets the CLI print a worker's bad-input error as one line."""
    for e in _chain(exc):
        if isinstance(e, UserError) and not isinstance(getattr(e, "cause", None), BaseException):
            return e
        # Ray Data task errors cross process boundaries as text: the original is in the message.
        m = _REMOTE_USER_ERROR.search(str(e))
        if m:
            return UserError(m.group(1).strip())
    return None


# Errors of the storage under an output, not of raycv: the disk is full, over quota, read-only,
# or refuses us. Matched by errno, or by text where the error crossed Ray as a string.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EFBIG: "file too large"}
_STORAGE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied",
                           re.IGNORECASE)


def find_storage_error(exc: BaseException) -> str | None:
    """A short reason when an exception (maybe wrapped by Ray) comes from the storage, else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[e.errno]
        m = _STORAGE_TEXT.search(str(e))
        if m:
            return m.group(0).lower()
    return None
