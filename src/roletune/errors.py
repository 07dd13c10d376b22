"""Errors a user can act on. The CLI prints any of them as one line, without a traceback."""


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
