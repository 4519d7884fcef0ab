"""Errors for people: one message naming the file, the key and the fix."""

from __future__ import annotations


class ConfigError(Exception):
    """A bad job file, fragment or override. The CLI prints it and exits with status 2."""


class ConfigValueError(ValueError):
    """Raised by a config dataclass's ``__post_init__`` for an out-of-range value.

    ``key`` is the field name inside that dataclass; the loader turns it into the full
    key path and names the file or override that set it.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigValueError(key, message) unless ``condition`` holds."""
    if not condition:
        raise ConfigValueError(key, message)
