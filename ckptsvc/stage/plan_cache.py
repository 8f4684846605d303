"""``PlanCache``: the last few plans of a checkpointer, by the state's signature."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["PlanCache"]

V = TypeVar("V")


class PlanCache(Generic[V]):
    """The last ``size`` plans, by key (a state's signature): a training loop that saves
    the same model every N steps plans once."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._plans: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make()
            while len(self._plans) > self._size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan
