"""Checks of values read from JSON and config files, shared by the readers and configs that take them.

Python's bool is an int, but JSON's `true` is no offset, count or id, so the number checks refuse it.
"""

from __future__ import annotations

import math

MIN_WINDOW = 8  # positions: [CLS], [SEP] and a few tokens beyond the overlap
# No machine has the cores, and torch and ONNX Runtime fail on more (an overflow, a MemoryError).
MAX_THREADS = 1024


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_fraction(value) -> bool:
    return is_finite_number(value) and 0 <= value <= 1


def is_string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def window_rules(max_length_name: str, max_length, stride_name: str, stride) -> tuple:
    """check_rules' rules for a window setting: its length and the overlap of neighbouring windows."""
    length_ok = is_integer(max_length) and max_length >= MIN_WINDOW
    return ((max_length_name, length_ok, f"an integer of at least {MIN_WINDOW}"),
            (stride_name, not length_ok or (is_integer(stride) and 0 <= stride < max_length - 2),  # needs a length
             f"an integer from 0 to under {max_length_name} - 2"))


def check_rules(owner, rules) -> None:
    """ValueError naming each (field, holds, rule) of `owner` (a config dataclass) whose rule does not hold."""
    problems = [f"{name} must be {rule}, not {getattr(owner, name)!r}" for name, holds, rule in rules if not holds]
    if problems:
        raise ValueError("; ".join(problems))
