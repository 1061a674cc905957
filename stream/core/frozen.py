"""`evolve(obj, **changes)`: `dataclasses.replace` for the core's frozen dataclasses, cheaply.

`dataclasses.replace` looks up every field and runs `__init__` (one `object.__setattr__` per field
for a frozen class): ~10 µs, and a conversation's state, its monitor's group and the metadata of
its pending utterances are replaced several times per utterance. The core's records are plain
frozen dataclasses (no `__post_init__`, no `init=False` fields, no slots), so a copy of the
instance's fields with `changes` applied is the same object `replace` builds.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def evolve(obj: T, **changes) -> T:
    """A copy of the frozen dataclass `obj` with `changes` (field names only, as `replace`)."""
    d = obj.__dict__
    for name in changes:
        if name not in d:
            raise TypeError(f"{type(obj).__name__} has no field {name!r}")
    new = object.__new__(type(obj))
    object.__setattr__(new, "__dict__", {**d, **changes})
    return new


def check_evolvable(cls: type) -> type:
    """Class decorator: fail at import if `evolve` cannot stand in for `replace` on `cls`."""
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__") or any(not f.init for f in fields(cls)):
        raise TypeError(f"{cls.__name__}: evolve() needs a plain dataclass (no __post_init__, slots or init=False fields)")
    return cls
