"""Events: the single record of what happened. The journal, the progress display and reports subscribe to them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "lab.build.step", "lab.vm.booted"
    subject: str  # what it is about: a VM name, a unit, an image key
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    # for long steps: progress so far and the expected total, in the same unit
    done: float | None = None
    total: float | None = None
    at: float = field(default_factory=time.time)


EventSink = Callable[[Event], None]


def discard(_event: Event) -> None:
    """A sink that ignores everything (library use without a display)."""


class EventLog:
    """Collects events in memory (tests, JSON output) and forwards them to other sinks."""

    def __init__(self, *forward: EventSink) -> None:
        self.events: list[Event] = []
        self._forward = forward

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        for sink in self._forward:
            sink(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]
