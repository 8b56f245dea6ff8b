"""The base of every options model: strict (a misspelt key is an error) and typed, one description
per field. The schema's sections and each component's own options (`local.<method>.*`, a data
set's `data.*` keys) derive from it."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError


class Options(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # pydantic's lax mode reads `steps: true` as 1; a bool where a number belongs is a mistake.
        if isinstance(value, bool):
            # whole words: a section class may be named ...Checkpointing...
            annotation = set(re.findall(r"\w+", str(cls.model_fields[info.field_name].annotation)))
            if "bool" not in annotation and ("int" in annotation or "float" in annotation):
                word = "an integer" if "int" in annotation else "a number"
                raise PydanticCustomError("bool_for_number", "expected {word}, got {value}",
                                          {"word": word, "value": str(value).lower()})
        return value


class NoOptions(Options):
    """A component with no options of its own."""


_TYPE_WORDS = {
    "float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer", "int_type": "an integer",
    "int_from_float": "an integer", "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "model_type": "a mapping", "dict_type": "a mapping",
    "list_type": "a list",
}


def format_validation_error(err: ValidationError, prefix: str = "", when: str = "") -> str:
    """First error only, as `key.path: expected ..., got ...` — one line a user can act on.
    `prefix`: the section the validated model sits in (`data` for a data set's own options);
    `when`: the choice that makes its keys apply (`data.name is token_bin`), for a missing key."""
    e = err.errors()[0]
    path = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]])
    got = e.get("input")
    kind = e["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind in _TYPE_WORDS:
        return f"{path}: expected {_TYPE_WORDS[kind]}, got {got!r}"
    if kind == "bool_for_number":
        return f"{path}: {e['msg']}"
    if kind == "literal_error":
        return f"{path}: expected one of {e['ctx']['expected']}, got {got!r}"
    if kind == "value_error":
        msg = str(e["ctx"]["error"]) if "ctx" in e else e["msg"]
        # Cross-field validators already name their keys; don't prefix the section twice.
        return msg if not path or msg.startswith(path) else f"{path}: {msg}"
    if kind == "missing":
        return f"{path}: required" + (f" when {when}" if when else "")
    return f"{path}: {e['msg'].lower()}, got {got!r}" if path else e["msg"]


def validate_options(options: Optional[type[Options]], values: dict, where: str, when: str = "") -> Options:
    """`values` validated by a component's `options` model; ValueError with the one-line message
    (`where.key: ...`; `when`: see `format_validation_error`) otherwise, which the enclosing
    section's validator passes on."""
    try:
        return (options or NoOptions).model_validate(values)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, where, when)) from None
