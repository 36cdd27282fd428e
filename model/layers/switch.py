"""A process-wide choice between an accelerated kernel and its plain PyTorch twin (timm's
pattern): read once from an environment variable, changeable in code, and checked either way,
so a misspelt value is an error rather than a silent fall-back to the default."""

from __future__ import annotations

import os

from ..errors import ConfigError


class Switch:
    def __init__(self, env: str, choices: tuple[str, ...], what: str):
        self.env, self.choices, self.what = env, choices, what
        self.value = choices[0]
        self.set(os.environ.get(env, choices[0]))

    def set(self, value: str) -> None:
        if value not in self.choices:
            raise ConfigError(f"{self.what} {value!r} unknown; choose from {self.choices} ({self.env})")
        self.value = value
