"""How library code tells the outside world what it is doing, without printing.

Stages take a `Reporter`; the CLI passes one that renders with rich (progress bars on a
terminal, plain lines otherwise, nothing with --quiet). Python callers get the silent default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Task:
    """A unit of progress: `advance` moves the bar, `update` sets displayed fields (losses...)."""

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **fields: object) -> None:
        pass


class Reporter:
    """Silent by default; subclass to render."""

    def info(self, message: str) -> None:
        pass

    def debug(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield Task()


class ListReporter(Reporter):
    """Collects messages; handy in tests and notebooks."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.messages.append(("info", message))

    def debug(self, message: str) -> None:
        self.messages.append(("debug", message))

    def warn(self, message: str) -> None:
        self.messages.append(("warn", message))
