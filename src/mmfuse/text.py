"""Small text rules shared by every layer: what counts as a blank (missing) value, and errors in one line.

Standard library only: the records layer and the command line import it without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def is_blank(value: object) -> bool:
    """None, or a string that is empty or only whitespace: a value a record leaves out (missing, never an input)."""
    return value is None or (isinstance(value, str) and not value.strip())


def one_line(err: BaseException | str, limit: int | None = None, *, typed: bool = False) -> str:
    """The first line of an error's message, stripped (the exception's type name when the message is empty),
    cut to `limit` characters. For a message whose first line says what went wrong.

    Args:
        err: an exception, or a message already taken from one (an empty one stays empty).
        limit: the most characters returned; None keeps the whole line.
        typed: `Type: first line` (a message for someone who will report it), and a cut line ends in "..." (still
            at most `limit` characters) so the reader sees it was cut.
    """
    lines = str(err).strip().splitlines()
    name = type(err).__name__ if isinstance(err, BaseException) else ""
    text = (f"{name}: {lines[0]}" if typed and name else lines[0]) if lines else name
    if limit is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..." if typed else text[:limit]


def flattened(err: BaseException | str, limit: int | None = None) -> str:
    """The whole message on one line: every run of whitespace (line breaks, tabs) one space, cut to `limit`
    characters. For a message whose details come on later lines (torch's `load_state_dict` size mismatches)."""
    text = " ".join(str(err).split())
    return text if limit is None else text[:limit]


def format_top(label: Any, probabilities: Mapping[str, float], top: int) -> str:
    """`label   (c1 0.900, c2 0.050)`: the prediction and the `top` most probable classes (the tasks' and the ONNX
    engine's terminal line)."""
    best = sorted(probabilities.items(), key=lambda kv: -kv[1])[:top]
    return f"{label}   ({', '.join(f'{c} {p:.3f}' for c, p in best)})"
