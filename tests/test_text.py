"""`mmfuse.text`: what counts as a blank (missing) value, and an error message in one line."""

from __future__ import annotations

import math

import pytest

from mmfuse.text import flattened, is_blank, one_line


@pytest.mark.parametrize("value", [None, "", " ", "\t\n "])
def test_blank_values(value: object) -> None:
    assert is_blank(value)


@pytest.mark.parametrize("value", ["x", " x ", 0, 0.0, False, math.nan, [], {}])
def test_values_that_are_not_blank(value: object) -> None:
    assert not is_blank(value)  # 0, False and empty lists are values; NaN is a table's concern (tabular.is_missing)


def test_one_line_is_the_first_line_or_the_type_name() -> None:
    assert one_line(ValueError("  bad value\nsecond line")) == "bad value"
    assert one_line(ValueError("abcdef"), 3) == "abc"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("\n\n")) == "RuntimeError"
    assert one_line("plain text\nmore") == "plain text" and one_line("") == ""


def test_flattened_keeps_every_line_on_one() -> None:
    err = RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for w: [3] vs [4].\n")
    assert flattened(err) == "Error(s) in loading state_dict: size mismatch for w: [3] vs [4]."
    assert flattened(err, 9) == "Error(s) "


def test_one_line_typed_names_the_type_and_marks_a_cut() -> None:
    assert one_line(RuntimeError("boom\nmore"), typed=True) == "RuntimeError: boom"
    assert one_line(KeyError(), typed=True) == "KeyError"  # no message: the type name once
    cut = one_line(ValueError("x" * 50), 20, typed=True)
    assert cut == "ValueError: xxxxx..." and len(cut) == 20
    assert one_line(ValueError("short"), 20, typed=True) == "ValueError: short"  # nothing cut, no "..."
    assert one_line("plain text", typed=True) == "plain text"  # a message alone has no type to name
