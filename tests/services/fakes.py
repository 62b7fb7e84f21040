"""A stand-in for the device tier the registry talks to (app.inference.slots.DeviceSlots): nothing is
ever resident; pinned names and retired weights are recorded for assertions."""

from __future__ import annotations


class FakeDevice:
    def __init__(self, pinned: set[str] | None = None):
        self.pinned = set(pinned or ())
        self.retired: list = []

    def is_resident(self, adapter) -> bool:
        return False

    def is_pinned(self, name: str) -> bool:
        return name in self.pinned

    def retire(self, adapter) -> None:
        self.retired.append(adapter)
