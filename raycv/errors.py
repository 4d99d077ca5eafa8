"""User-facing errors: the CLI prints these as one line and exits with status 2."""

import re


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a checkpoint, a dataset."""


class ConfigError(UserError):
    """A config key, type or value that cannot work."""


_REMOTE_USER_ERROR = re.compile(r"raycv\.errors\.(?:UserError|ConfigError): ([^\n]+)")


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind an exception that crossed Ray (task, actor and Train worker errors
    wrap the original), or None. Lets the CLI print a worker's bad-input error as one line."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, UserError) and not isinstance(cause, BaseException):
            return e
        for nxt in (cause, e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        # Ray Data task errors cross process boundaries as text: the original is in the message.
        m = _REMOTE_USER_ERROR.search(str(e))
        if m:
            return UserError(m.group(1).strip())
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(v for v in failures.values() if isinstance(v, BaseException))
    return None
