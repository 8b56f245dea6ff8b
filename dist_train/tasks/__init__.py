"""The task registry: one entry per kind of workload (`lm`, `classify`, `pde`). A new workload is one file
with a `Task` subclass plus one line here, not a branch in every trainer."""

from __future__ import annotations

from dist_train.errors import UserError
from dist_train.tasks.base import Task
from dist_train.tasks.classify import Classification
from dist_train.tasks.lm import LanguageModelling
from dist_train.pde.task import PDESolving

TASKS: dict[str, Task] = {task.name: task for task in (LanguageModelling(), Classification(), PDESolving())}

__all__ = ["TASKS", "Task", "get_task"]


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None
