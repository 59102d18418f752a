"""What every recipe model (recipe sections, step parameters) shares: no `true` / `false` where a number is
asked for. Pydantic's lax mode reads `epochs: true` as 1 and `ratio: false` as 0.0, a slip of the pen that
would run as a setting nobody chose; a field whose type admits bool still takes one. (A `field_validator("*")`
would say it by field, but pydantic allows none on a discriminator field such as `source`.)"""
from __future__ import annotations

import typing

from pydantic import BaseModel, model_validator


def _admits_bool(annotation) -> bool:
    if annotation is bool:
        return True
    return any(_admits_bool(a) for a in typing.get_args(annotation))


def _admits_number(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_admits_number(a) for a in typing.get_args(annotation))


class NoBoolNumbers(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data):
        """A bool given for a number becomes its word ("true"), which the field's own validation then refuses
        at the field's own place in the recipe (a model-level error would name only the section)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name) or next((f for f in cls.model_fields.values() if f.alias == name), None)
            if isinstance(value, bool) and field is not None and _admits_number(field.annotation) \
                    and not _admits_bool(field.annotation):
                out[name] = str(value).lower()
        return out
