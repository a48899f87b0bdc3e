"""Pydantic pieces shared by the file schemas: located errors, and field types with our words.

Both file schemas (tuned tables, sweep files) are pydantic models; users read their errors
as a path into the file and a sentence, whatever pydantic's own wording.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ValidationError


def location_text(location: tuple) -> str:
    """('entries', 2, 'key', 'batch') -> 'entries[2].key.batch'."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def located_problems(error: ValidationError, prefix: tuple = ()) -> list[str]:
    """One 'where: what' line per error of `error`."""
    lines = []
    for item in error.errors(include_url=False):
        # Union members and tagged choices add their type names to the location.
        location = tuple(part for part in item["loc"]
                         if not (isinstance(part, str) and part[:1].isupper()))
        message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "is required"
        lines.append(f"{location_text(prefix + location)}: {message}")
    return lines


# ---- Field types whose errors read as the project's own sentences ------------------------


def _rule(check, text: str):
    def validate(value: Any) -> Any:
        if not check(value):
            raise ValueError(f"must be {text}, got {value!r}")
        return value
    return AfterValidator(validate)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PositiveInt = Annotated[Any, _rule(lambda v: _is_int(v) and v > 0, "a positive int")]
NonNegativeInt = Annotated[Any, _rule(lambda v: _is_int(v) and v >= 0, "an int >= 0")]
PositiveNumber = Annotated[Any, _rule(
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")]
NonNegativeNumber = Annotated[Any, _rule(
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
    "a number >= 0")]
Fraction = Annotated[Any, _rule(
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
    "a number in [0, 1]")]
Boolean = Annotated[Any, _rule(lambda v: isinstance(v, bool), "true or false")]


def one_of(*values: Any):
    """A field whose value must be one of `values`."""
    return Annotated[Any, _rule(lambda v: v in values, f"one of {list(values)}")]
