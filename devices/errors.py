"""The exceptions of fieldline: for programming and configuration errors only.

Bad *data* never raises out of a loop: it becomes a counted rejection (see ``devices.rejects``).
"""

from __future__ import annotations


class FieldlineError(Exception):
    """Base of every exception fieldline raises on purpose."""


class ConfigError(FieldlineError):
    """A configuration value is missing or wrong; ``key`` names it (dotted path)."""

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"config key '{key}'{where}: {problem}")


class ContractError(FieldlineError):
    """A message on the edge->cloud wire does not follow the contract; ``reason`` is countable."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
