"""The plan of `mmfuse compare`: every member (fusion x `--vary` combination x seed) and its config, validated
before anything trains.

A member's config is the user's YAML with `--set` applied, its fusion put in, the `--vary` values set (parsed as
YAML, like `--set`) and its seed; its folder is `OUT/members/<name>/`.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmfuse.builders import run_outline
from mmfuse.config import MAX_SEED, ConfigError, RunConfig, apply_overrides, default_config_path, parse_config
from mmfuse.workbench.compare_args import check_out, parse_fusions, parse_seeds, parse_vary
from mmfuse.workbench.compare_fusions import fusion_component, resolve_fusions


@dataclass
class Member:
    """One run of a comparison."""

    name: str  # folder name under OUT/members
    fusion: str
    vary: dict[str, str]  # {dotted key: value as given}
    seed: int
    cfg: RunConfig
    run_dir: Path

    @property
    def group(self) -> str:
        """The label shared by the seeds of one setting: the fusion and the varied values."""
        return " ".join([self.fusion, *(f"{k}={v}" for k, v in self.vary.items())])


@dataclass
class Plan:
    """Everything a comparison will train, validated before anything starts."""

    base: RunConfig
    config_path: str | None
    overrides: list[str]
    fusions: list[str]
    skipped: dict[str, str]  # {fusion: why the config's encoders cannot feed it}
    vary: dict[str, list[str]]
    seeds: list[int]
    out: Path
    members: list[Member] = field(default_factory=list)


def _read_raw(config: str | Path | None) -> dict[str, Any]:
    """The config file's YAML as written (the built-in one when None), before any validation."""
    path = Path(config) if config is not None else default_config_path()
    return yaml.safe_load(path.read_text()) or {}


def _member_name(fusion: str, vary: dict[str, str], seed: int) -> str:
    """The member's folder name: `<fusion>_<key>=<value>..._seed<k>`, unsafe characters as `_`, 150 at most."""
    parts = [fusion, *(f"{k}={v}" for k, v in vary.items()), f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "_".join(parts))[:150]


def _member_config(raw: dict[str, Any], fusion: dict[str, Any], vary: dict[str, str], seed: int) -> RunConfig:
    """`raw` with the member's fusion, `--vary` values and seed put in (no progress bar), validated.

    Raises:
        ConfigError: a varied value the config refuses, named with the `--vary` values and the fusion.
    """
    data = copy.deepcopy(raw)
    data.setdefault("model", {})["fusion"] = dict(fusion)
    for key, value in vary.items():
        try:
            apply_overrides(data, [f"{key}={value}"])
        except ConfigError as err:
            raise ConfigError(str(err).replace("--set", "--vary", 1)) from None
    data["seed"] = seed
    data.setdefault("train", {})["progress_bar"] = False
    try:
        return parse_config(data)
    except ConfigError as err:
        shown = ", ".join(f"{k}={v}" for k, v in vary.items())
        raise ConfigError(f"--vary {shown} (fusion {fusion['name']}): {err}") from None


def plan_compare(
    config: str | Path | None,
    overrides: Sequence[str],
    fusions: str | Sequence[str],
    seeds: int,
    vary: Sequence[str],
    out: str | Path | None = None,
) -> Plan:
    """Validate the command and build every member's config (nothing is trained yet).

    Args:
        config: YAML run config (None: the built-in easy-VQA one).
        overrides: `--set a.b=c`, applied to every member.
        fusions: the `--fusions` text, or its items: fusion names, "all", `name{yaml options}` (`parse_fusions`).
        seeds: how many seeds; member k of a setting uses the config's seed + k.
        vary: `--vary KEY=V1,V2,...` options; every combination of their values is a setting.
        out: the comparison's folder (default: runs/compare-<name>-<date>-<time>).
    """
    from mmfuse.config import load_config

    base = load_config(config, list(overrides))  # a bad config or --set answers here, as `train` would
    outline = run_outline(base)
    n_seeds = parse_seeds(seeds)
    if outline.seed + n_seeds - 1 > MAX_SEED:
        raise ConfigError(
            f"--seeds: the config's seed {outline.seed} + {n_seeds - 1} is over the largest seed {MAX_SEED}"
        )
    axes = parse_vary(vary)
    listed, options = parse_fusions(fusions)
    names, skipped = resolve_fusions(listed, base, options)
    raw = apply_overrides(_read_raw(config), list(overrides))
    out = Path(out) if out else Path("runs") / f"compare-{outline.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out(out)
    plan = Plan(base, str(config) if config else None, list(overrides), names, skipped, axes, [], out)
    plan.seeds = [outline.seed + k for k in range(n_seeds)]
    plan.members = _members(plan, raw, options)
    if len({m.name for m in plan.members}) != len(plan.members):
        raise ConfigError("--vary: two values give the same member folder name; use values that differ in letters")
    return plan


def _members(plan: Plan, raw: dict[str, Any], options: dict[str, dict[str, Any]]) -> list[Member]:
    """Every member, seed by seed, then `--vary` combination, then fusion (the order they train in)."""
    axes = plan.vary
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else [{}]
    base_fusion = run_outline(plan.base).fusion
    members = []
    for seed in plan.seeds:
        for combo in combos:
            for f in plan.fusions:
                cfg = _member_config(raw, fusion_component(base_fusion, f, options.get(f)), combo, seed)
                name = _member_name(f, combo, seed)
                members.append(Member(name, f, combo, seed, cfg, plan.out / "members" / name))
    return members
