"""The check that a model can read the data set's batches: a data set declares its task
(`DatasetSpec.task`, see `dist_train.data.base`), a model the task whose data it reads
(`ModelSpec.task`, see `dist_train.models.spec`)."""

from __future__ import annotations

from dist_train.registry import DATASETS, MODELS
# how an error message names a task's data sets
DATA_WORDS: dict[str, str] = {"lm": "a token", "classify": "an image", "pde": "a PDE"}


def data_sets_for(task: str) -> list[str]:
    """The registered data sets whose batches feed `task`."""
    return [name for name in DATASETS if DATASETS.get(name).task == task]


def check_pairing(data_task: str, data_name: str, model_name: str) -> None:
    """Raise ValueError (pydantic turns it into the config error) when the model cannot read the data."""
    wanted = MODELS.get(model_name).task
    if data_task != wanted:
        readers = " or ".join(data_sets_for(wanted))
        raise ValueError(f"model.name: {model_name} needs {DATA_WORDS.get(wanted, 'a ' + wanted)} data set "
                         f"({readers}), not data.name={data_name}")
