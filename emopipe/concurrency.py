"""One way to map a function over a long input on an executor with a bounded number of tasks in flight,
so that memory does not grow with the dataset (Executor.map submits the whole input at once)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], *, in_flight: int,
                ordered: bool = True) -> Iterator[R]:
    """fn(item) for every item, at most `in_flight` submitted at a time: in input order (ordered) or as
    they complete. The input is read lazily, only as far as the tasks in flight need."""
    todo = iter(items)
    if ordered:
        queue: deque[Future] = deque()
        for item in todo:
            queue.append(pool.submit(fn, item))
            if len(queue) >= in_flight:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
        return
    running: set[Future] = set()
    while True:
        for item in todo:
            running.add(pool.submit(fn, item))
            if len(running) >= in_flight:
                break
        if not running:
            return
        done, running = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()
