"""Small text rules shared by every layer: what counts as a blank (missing) value, and errors in one line.

Standard library only: the records layer and the command line import it without torch.
"""

from __future__ import annotations


def is_blank(value: object) -> bool:
    """None, or a string that is empty or only whitespace: a value a record leaves out (missing, never an input)."""
    return value is None or (isinstance(value, str) and not value.strip())


def one_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first line of an error's message, stripped (the exception's type name when the message is empty),
    cut to `limit` characters. For a message whose first line says what went wrong."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if limit is None else text[:limit]


def flattened(err: BaseException | str, limit: int | None = None) -> str:
    """The whole message on one line: every run of whitespace (line breaks, tabs) one space, cut to `limit`
    characters. For a message whose details come on later lines (torch's `load_state_dict` size mismatches)."""
    text = " ".join(str(err).split())
    return text if limit is None else text[:limit]
