"""Turn a pydantic ValidationError into one RecipeError paragraph a person can act on: the field
as they wrote it (aliases, no union tags), the bad value, and what would be accepted."""
from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ValidationError

from core.errors import RecipeError, field_error


def pydantic_error(e: ValidationError, root: type, where: str, prefix: str = "") -> RecipeError:
    err = e.errors(include_url=False)[0]
    loc = list(err["loc"])
    display, parent_cls = _walk(root, loc[:-1]) if loc else ([], root)
    field = _path([prefix] + display + loc[-1:]) if loc else prefix
    etype = err["type"]
    if etype == "extra_forbidden":
        accepted = sorted(parent_cls.model_fields) if _is_model(parent_cls) else None
        accepted = [_alias(parent_cls, a) for a in accepted] if accepted else None
        return field_error(where, field, "unknown key", accepted=accepted)
    if etype == "missing":
        return field_error(where, field, "is required but missing")
    value = err.get("input")
    if isinstance(value, (dict, list)) and len(repr(value)) > 80:
        value = None
    # pydantic's wording, less what only a programmer reads: "Value error, " before a validator's own message,
    # and the class name in "a valid dictionary or instance of BenchSpec".
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = re.sub(r" or instance of \w+", "", msg)
    if etype in ("int_parsing", "float_parsing") and value in ("true", "false"):
        # core.params turned a YAML true / false given for a number into its word: say it as written.
        return field_error(where, field, f"a number is asked for here, not {value}")
    return field_error(where, field, msg, value=value)


def _path(parts: list) -> str:
    """['bench', 'batch_sizes', 1] -> 'bench.batch_sizes[1]'."""
    out = ""
    for p in parts:
        if p == "" or p is None:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _alias(cls, name: str) -> str:
    f = cls.model_fields[name]
    return f.alias or name


def _is_model(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _walk(cls, loc: list) -> tuple[list, Any]:
    """Follow an error location through the schema: returns the path a user would write
    (without pydantic's union tags) and the model class at the end of it."""
    shown: list = []
    for part in loc:
        cls = _unwrap(cls)
        if _is_union(cls):
            members = [_unwrap(m) for m in typing.get_args(cls)]
            tagged = [m for m in members if _is_model(m) and _tag_of(m) == part]
            if tagged:  # a discriminated-union tag: not a key the user wrote
                cls = tagged[0]
                continue
        if _is_model(cls):
            name = next((n for n, f in cls.model_fields.items() if part in (n, f.alias)), None)
            shown.append(_alias(cls, name) if name else part)
            cls = cls.model_fields[name].annotation if name else None
        else:
            shown.append(part)
            args = typing.get_args(cls)
            cls = args[-1] if args else None
    cls = _unwrap(cls)
    return shown, cls


def _unwrap(cls):
    while typing.get_origin(cls) is Annotated:
        cls = typing.get_args(cls)[0]
    if _is_union(cls):
        members = [a for a in typing.get_args(cls) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return cls


def _is_union(cls) -> bool:
    import types
    return typing.get_origin(cls) in (Union, types.UnionType)


def _tag_of(model_cls) -> Optional[str]:
    for key in ("source", "type"):
        f = model_cls.model_fields.get(key)
        if f is not None and typing.get_origin(f.annotation) is Literal:
            return typing.get_args(f.annotation)[0]
    return None
