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


def require(ok: bool, key: str, rule: str, value) -> None:
    """Raises "`key` must be `rule`, got `value`" about `key` unless `ok`: a field's own rule, checked by its owner."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value}", key)


def require_choice(key: str, value: str, choices) -> None:
    """Raises "`key` must be one of ..., got ..." about `key` unless `value` is one of `choices` (names, or a table
    whose keys are the names)."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}", key)
