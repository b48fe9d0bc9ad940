"""Hooks through which other apps follow the engine, so that the engine never imports them.

**Terminal transitions.** An app that must decide something when a task reaches a final status
(``workflows_app`` starts a run's next steps or compensates it) registers a
``TerminalObserver`` in its ``AppConfig.ready()``. The engine calls it inside the transaction
that records the outcome, in two phases:

1. ``lock(task)``, first, before the task's row is touched: the observer takes its own locks
   there (the workflow observer locks the run's row), which keeps one lock order on every path
   (a run's row before its tasks' rows);
2. ``finished(task, held)``, after the guarded transition succeeded, with what ``lock``
   returned: a decision made here commits or rolls back with the outcome itself, so it can
   never be lost or made twice.

``observes(task)`` says whether the observer cares; a task no observer cares about costs no
statement and no transaction beyond its own transition.

Outcomes written together (the worker's ``Completions``) use the same two phases for many
tasks at once: ``lock_many(tasks)`` takes every lock in the observer's one order before the
task rows are written, ``finished_many(tasks, held)`` decides for the tasks whose transition
took place, once for all of them (two branches of a join finishing together start the join
once; the steps the batch starts are created and published together).

**Reconcilers.** The dispatcher's sweep calls each registered reconciler on every sweep (the
workflow reconciler decides runs that a lost decision left with nothing running).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tasks_app.models import Task


class TerminalObserver(Protocol):
    def observes(self, task: Task) -> bool: ...

    def lock(self, task: Task) -> Any: ...

    def finished(self, task: Task, held: Any) -> None: ...

    def lock_many(self, tasks: Sequence[Task]) -> Any: ...

    def finished_many(self, tasks: Sequence[Task], held: Any) -> None: ...


_observers: list[TerminalObserver] = []
_reconcilers: list[Callable[[], Any]] = []


def register_terminal_observer(observer: TerminalObserver) -> None:
    """Add ``observer``, once per class (``ready()`` may run more than once)."""
    if not any(type(known) is type(observer) for known in _observers):
        _observers.append(observer)


def register_reconciler(reconciler: Callable[[], Any]) -> None:
    if reconciler not in _reconcilers:
        _reconcilers.append(reconciler)


def observed(task: Task) -> bool:
    """Whether any observer follows ``task``'s terminal transition."""
    return any(observer.observes(task) for observer in _observers)


class Terminal:
    """The observers of one task's terminal transition, each with what it locked.

    Make it inside the outcome's transaction, before the transition; call ``finished`` with the
    task as the transition left it, only if the transition took place.
    """

    def __init__(self, task: Task) -> None:
        self._held = [
            (observer, observer.lock(task)) for observer in _observers if observer.observes(task)
        ]

    def finished(self, task: Task) -> None:
        for observer, held in self._held:
            observer.finished(task, held)


class Terminals:
    """The observers of many tasks' terminal transitions written in one statement.

    Make it inside the outcomes' transaction, before they are written; call ``finished`` with
    the tasks whose transition took place (a refused one concerns no observer).
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        self._held: list[tuple[TerminalObserver, list[Task], Any]] = []
        for observer in _observers:
            followed = [task for task in tasks if observer.observes(task)]
            if followed:
                self._held.append((observer, followed, observer.lock_many(followed)))

    def finished(self, tasks: Sequence[Task]) -> None:
        done = {task.pk for task in tasks}
        for observer, followed, held in self._held:
            finished = [task for task in followed if task.pk in done]
            if finished:
                observer.finished_many(finished, held)


def reconcile() -> None:
    for reconciler in _reconcilers:
        reconciler()
