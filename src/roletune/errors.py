"""Errors a user can act on. The CLI prints any of them as one line, without a traceback."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name where it has none), cut at `limit`
    characters: the part of a library's error worth one line of ours."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if limit is None else line[:limit]


def brief(exc: BaseException) -> str:
    """`Type: first line` of an exception (160 characters at most), for a line saying why something was
    left out."""
    return f"{type(exc).__name__}: {first_line(exc, 160)}"


class RoletuneError(Exception):
    """Something the user can fix: bad input, a missing file, an impossible setting."""


class ConfigError(RoletuneError):
    """A configuration file or override that does not fit the schema."""


class DataError(RoletuneError):
    """A dataset file or record that cannot be read; the message names file, record and field."""


class ModelError(RoletuneError):
    """A base model, tokenizer or device that cannot be loaded or used."""


class RunError(RoletuneError):
    """An output or run folder that cannot be used as asked (exists, missing, not a roletune run)."""


class Interrupted(RoletuneError):
    """SIGINT or SIGTERM during training: a checkpoint was saved at the step boundary; the run is
    resumable, not finished. The CLI adds the exact command to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


class NonFiniteError(RoletuneError):
    """A NaN or infinite loss / gradient norm, with train.on_nonfinite=stop."""
