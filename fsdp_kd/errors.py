"""The error every layer raises for bad user input, in a module of its own so that any module can raise it without
depending on the configuration's parser."""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with the user's configuration; its message is meant to be printed as is. Every rank finds it
    alike, so one rank says it.

    `key`, where given, is the config key the message is about: a check made outside the parser (a spec's own
    fields) names it, and the parser adds the file and line the key came from (`config.validate`)."""
    same_on_every_rank = True

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
