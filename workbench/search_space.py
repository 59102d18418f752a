"""A search's candidates as step lists: a template of steps and a space of parameter values
('steps[i].param' -> values). Pure data, shared by the recipe check and the search itself."""
from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Optional

SPACE_KEY = re.compile(r"^steps\[(\d+)\]\.([A-Za-z_]\w*)$")  # steps[i].param


def _split(raw) -> tuple[str, dict]:
    if isinstance(raw, str):
        return raw, {}
    (name, params), = raw.items()
    return str(name), dict(params or {})


def apply(template: list, assignment: dict[str, Any]) -> list:
    """The template's steps with `assignment` ('steps[i].param' -> value; None: the default) set."""
    steps = [dict([_split(s)]) for s in copy.deepcopy(template)]
    for key, value in assignment.items():
        i, param = SPACE_KEY.match(key).groups()
        name, params = _split(steps[int(i)])
        if value is None:
            params.pop(param, None)
        else:
            params[param] = value
        steps[int(i)] = {name: params}
    return steps


def grid(space: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def candidates_of(sp, limit: Optional[int] = None) -> list[list]:
    """The candidates' step lists, in grid order (what validate checks)."""
    return [apply(sp.steps, a) for a in grid(sp.space)[:limit]]
