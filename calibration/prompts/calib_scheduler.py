"""A small cooperative task scheduler with priorities and deadlines."""

import heapq
import itertools
from dataclasses import dataclass, field


class SchedulerError(Exception):
    """Raised when a task cannot be scheduled."""


@dataclass(order=True)
class Task:
    priority: int
    sequence: int
    name: str = field(compare=False)
    deadline: float = field(compare=False, default=float("inf"))
    steps: list = field(compare=False, default_factory=list)

    def done(self):
        return not self.steps


class Scheduler:
    """Runs tasks one step at a time, highest priority (lowest number) first."""

    def __init__(self, clock):
        self._clock = clock
        self._queue = []
        self._counter = itertools.count()
        self._finished = []

    def add(self, name, steps, priority=10, deadline=None):
        if not steps:
            raise SchedulerError(f"task {name!r} has no steps")
        if deadline is not None and deadline < self._clock():
            raise SchedulerError(f"task {name!r} is already past its deadline")
        task = Task(priority, next(self._counter), name, deadline or float("inf"), list(steps))
        heapq.heappush(self._queue, task)
        return task

    def run_once(self):
        """Run one step of the most urgent task; return its name, or None if idle."""
        while self._queue:
            task = heapq.heappop(self._queue)
            if task.deadline < self._clock():
                self._finished.append((task.name, "expired"))
                continue
            step = task.steps.pop(0)
            step()
            if task.done():
                self._finished.append((task.name, "done"))
            else:
                heapq.heappush(self._queue, task)
            return task.name
        return None

    def run(self, limit=None):
        count = 0
        while limit is None or count < limit:
            if self.run_once() is None:
                break
            count += 1
        return count

    def finished(self):
        return list(self._finished)


def make_counter(log, label, times):
    """Steps that append label to log, `times` times."""

    def step():
        log.append(label)

    return [step] * times
