"""Parsing the `mmfuse compare` command's own arguments: `--vary`, `--seeds`, `--out` and `--fusions`.

Each parser answers a bad argument with one `ConfigError` line naming the option; nothing is built or trained here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mmfuse.config import ConfigError
from mmfuse.text import one_line

FORBIDDEN_VARY = {"seed": "--seeds", "model.fusion": "--fusions", "model.fusion.name": "--fusions"}
MAX_SEEDS = 1000  # seeds per setting: each is a full training run


def split_values(text: str) -> list[str]:
    """`a,b,[1,2],'x,y'` -> ["a", "b", "[1,2]", "'x,y'"]: commas inside brackets or quotes do not split."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_vary(items: Sequence[str]) -> dict[str, list[str]]:
    """`--vary KEY=V1,V2,...` options -> {key: [raw values]}; the values are parsed as YAML later (like --set)."""
    vary: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(p.strip() for p in key.split(".")):
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,..., e.g. train.balance.alpha=0.1,0.5")
        if key in FORBIDDEN_VARY:
            raise ConfigError(f"--vary {item!r}: vary {key} with {FORBIDDEN_VARY[key]}, not --vary")
        if key in vary:
            raise ConfigError(f"--vary {key}: given twice; list all its values in one --vary")
        values = split_values(raw)
        if any(not v for v in values):
            raise ConfigError(f"--vary {item!r}: an empty value; separate values by single commas")
        if len(set(values)) != len(values):
            raise ConfigError(f"--vary {item!r}: a value is listed twice")
        vary[key] = values
    return vary


def parse_seeds(text: str | int) -> int:
    """The number of seeds, from 1 to `MAX_SEEDS`."""
    try:
        n = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"--seeds: expected a number of seeds (>= 1), got {str(text)[:40]!r}") from None
    if n < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {n}")
    if n > MAX_SEEDS:
        raise ConfigError(f"--seeds: at most {MAX_SEEDS} seeds (each is a training run per setting), got {n}")
    return n


def check_out(out: Path) -> None:
    """`--out` must be a new or empty folder, or a previous comparison's output (which is continued).

    Raises:
        ConfigError: a file, or a folder holding something else (its compare.md would be overwritten).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; name a folder (a new one, or a previous compare's output)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "compare.json").is_file() or (out / "members").is_dir():
        return
    raise ConfigError(
        f"--out {out}: the folder holds other files and is not a previous compare's output (no compare.json or "
        "members/); name a new or empty folder"
    )


def parse_fusions(text: str | Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """`--fusions` -> the names in order, and the options given to some of them.

    Items are comma-separated; each is a fusion name, `all`, or a name with options in YAML flow form:
    `film,co_attention{hidden_dim: 128, num_layers: 1}`. Commas inside braces belong to the options.

    Raises:
        ConfigError: options that are not a YAML mapping (unbalanced braces among them), options on `all`, or
            one fusion given two sets of options.
    """
    items = [i for part in ([text] if isinstance(text, str) else text) for i in split_values(part)]
    names: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    for item in (i.strip() for i in items):
        name, brace, rest = item.partition("{")
        name = name.strip()
        if brace:
            if item.count("{") != item.count("}"):
                raise ConfigError(f"--fusions {item!r}: the braces of the options do not pair up")
            if not rest.endswith("}"):
                raise ConfigError(f"--fusions {item!r}: nothing may follow the options' closing '}}'")
            try:
                opts = yaml.safe_load("{" + rest)
            except yaml.YAMLError as err:
                shown = one_line(err)
                raise ConfigError(f"--fusions {item!r}: options are not a YAML mapping ({shown})") from None
            if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
                raise ConfigError(f"--fusions {item!r}: options must be a mapping of option names to values")
            if not name or name == "all":
                raise ConfigError(f"--fusions {item!r}: options need one fusion's name before the '{{'")
            if "name" in opts:
                raise ConfigError(f"--fusions {item!r}: 'name' is not an option; write the fusion's name before '{{'")
            if name in options and options[name] != opts:
                raise ConfigError(f"--fusions: {name} is given two sets of options")
            options[name] = opts
        names.append(name)
    return names, options
