"""Which fusions a comparison trains: each named one with the options it gets, checked against the encoders.

A fusion other than the config's own inherits only the options every fusion shares (`CARRIED_OPTIONS`); one the
config's encoders cannot feed (tokens they lack, options that do not build) is refused when named and skipped,
with the reason, under `all`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from mmfuse.builders import build_encoders, build_fusion, run_outline
from mmfuse.config import Component, ConfigError, RunConfig
from mmfuse.encoders.base import EncoderOutput
from mmfuse.text import one_line

CARRIED_OPTIONS = ("output_dim", "adapters")  # fusion options every fusion that takes them inherits


def fusion_component(base: Component, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config's fusion as is when `name` is it; else `name` with the carried options it takes; then
    `options` (from `--fusions name{...}`) on top."""
    if name == base.name:
        return {"name": name, **base.options, **(options or {})}
    from mmfuse.fusion import FUSIONS

    accepted = inspect.signature(FUSIONS.get(name).__init__).parameters
    carried = {k: v for k, v in base.options.items() if k in CARRIED_OPTIONS and k in accepted}
    return {"name": name, **carried, **(options or {})}


def why_not_feedable(
    name: str, base: Component, encoders: dict[str, Any], options: dict[str, Any] | None = None
) -> str | None:
    """Why the encoders cannot feed fusion `name` (its options invalid for them, or tokens they lack), or None."""
    try:
        dims = {m: e.output_dim for m, e in encoders.items()}
        fusion = build_fusion(Component(**fusion_component(base, name, options)), dims)
    except ConfigError as err:
        return str(err).removeprefix("model.fusion: ")
    lacking = [m for m, e in encoders.items() if not e.has_tokens]
    if not fusion.needs_tokens or not lacking:
        return None
    dummy = {  # a 2x2 grid of tokens where an encoder gives tokens, none where it does not
        m: EncoderOutput(torch.zeros(2, e.output_dim), torch.zeros(2, 4, e.output_dim) if e.has_tokens else None)
        for m, e in encoders.items()
    }
    try:
        with torch.no_grad():
            fusion.eval()(dummy)
    except Exception as err:  # noqa: BLE001  (any failure means these encoders cannot feed it)
        return f"needs tokens that {', '.join(lacking)} does not give ({one_line(err)})"
    return None


def resolve_fusions(
    names: Sequence[str], base: RunConfig, options: dict[str, dict[str, Any]] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Registered fusion names in the given order ("all": every one the encoders can feed), and the skipped ones.
    `options`: fusion -> its options from `--fusions name{...}`; a fusion given options counts as named.

    Raises:
        ConfigError: an unknown name, a named fusion the encoders cannot feed, or no fusion at all.
    """
    wanted = _registered(names)
    encoders = build_encoders(base.model)
    options, fusion = options or {}, run_outline(base).fusion
    _check_options(options, wanted, fusion, {m: e.output_dim for m, e in encoders.items()})
    explicit = ({n.strip() for n in names} | set(options)) - {"all"}
    kept, skipped = [], {}
    for f in wanted:
        reason = why_not_feedable(f, fusion, encoders, options.get(f))
        if reason is None:
            kept.append(f)
        elif f in explicit:
            raise ConfigError(f"--fusions: {f} cannot be used with this config's encoders: {reason}")
        else:
            skipped[f] = reason
    if not kept:
        raise ConfigError("--fusions: none of the fusions can be fed by this config's encoders")
    return kept, skipped


def _registered(names: Sequence[str]) -> list[str]:
    """The names in order, "all" expanded to every registered fusion, duplicates and empty items dropped."""
    from mmfuse.fusion import FUSIONS

    wanted: list[str] = []
    for name in (n.strip() for n in names):
        for f in FUSIONS.names() if name == "all" else [name] if name else []:
            if f not in FUSIONS:
                raise ConfigError(f"--fusions: unknown fusion {f!r}; choose from: all, {', '.join(FUSIONS.names())}")
            if f not in wanted:
                wanted.append(f)
    if not wanted:
        raise ConfigError("--fusions: name at least one fusion (or 'all')")
    return wanted


def _check_options(
    options: dict[str, dict[str, Any]], wanted: list[str], base: Component, dims: dict[str, int]
) -> None:
    """Options given to a fusion not compared, or that do not build, are the options' fault (not the encoders').

    Args:
        dims: {modality: its encoder's output size D}.
    """
    for f in options:
        if f not in wanted:
            raise ConfigError(f"--fusions: options for {f!r}, which is not one of the fusions compared")
    for f, opts in options.items():
        try:
            build_fusion(Component(**fusion_component(base, f, opts)), dims)
        except ConfigError as err:
            shown = yaml.safe_dump(opts, default_flow_style=True).strip()
            raise ConfigError(f"--fusions: {f}{shown}: {str(err).removeprefix('model.fusion')[1:].strip()}") from None
