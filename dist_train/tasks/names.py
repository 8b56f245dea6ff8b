"""Which task each data set and each model belongs to: plain tables, importable from the config
schema without importing torch or any data set."""

from __future__ import annotations

# data.name -> the task its batches are for
DATA_TASKS: dict[str, str] = {"stdlib_bytes": "lm", "token_bin": "lm", "digits": "classify", "shapes32": "classify",
                             "reaction_diffusion": "pde", "diffusion_sorption": "pde"}
# model.name -> the task it is built for
MODEL_TASKS: dict[str, str] = {"gpt": "lm", "mlp": "classify", "cnn": "classify", "basis_mlp": "pde", "basis_fno": "pde"}
# how an error message names a task's data sets
DATA_WORDS: dict[str, str] = {"lm": "a token", "classify": "an image", "pde": "a PDE"}


def data_sets_for(task: str) -> list[str]:
    return [name for name, t in DATA_TASKS.items() if t == task]


def check_pairing(data_name: str, model_name: str) -> None:
    """Raise ValueError (pydantic turns it into the config error) when the model cannot read the data."""
    task, wanted = DATA_TASKS[data_name], MODEL_TASKS[model_name]
    if task != wanted:
        readers = " or ".join(data_sets_for(wanted))
        raise ValueError(f"model.name: {model_name} needs {DATA_WORDS.get(wanted, 'a ' + wanted)} data set "
                         f"({readers}), not data.name={data_name}")
