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
