"""`mmfuse compare`: train every fusion (and every value of other varied keys) over several seeds on the
same data and budget, and summarise them side by side.

A comparison is a set of *members*: one per fusion x combination of `--vary` values x seed. Each member is
an ordinary run folder (`OUT/members/<name>/`, trained by `mmfuse.train.run.train`), so `mmfuse evaluate`,
`predict` and `serve` work on it. Members with the same frozen encoders share the feature cache (it is keyed
by encoder and input), so each input is encoded once. A finished member (its `metrics.json` exists) is read
back, an interrupted one resumed from its last checkpoint, so a comparison that stopped is continued by the
same command.

Outputs: `OUT/compare.json` (every member and every group's mean and std over seeds), `OUT/compare.md` and
PNG plots (`mmfuse.workbench.plots`). With `stress`, each member is also swept over corrupted and missing
inputs (`mmfuse.workbench.stress.sweep`) and the curves and robustness summaries join the outputs.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mmfuse.builders import build_encoders, build_fusion, build_tasks
from mmfuse.config import (
    MAX_SEED,
    Component,
    ConfigError,
    RunConfig,
    apply_overrides,
    default_config_path,
    parse_config,
)
from mmfuse.encoders.base import EncoderOutput
from mmfuse.train.run import train, write_atomic
from mmfuse.workbench.pick import pick_markdown, pick_members

log = logging.getLogger(__name__)

CARRIED_OPTIONS = ("output_dim", "adapters")  # fusion options every fusion that takes them inherits
FORBIDDEN_VARY = {"seed": "--seeds", "model.fusion": "--fusions", "model.fusion.name": "--fusions"}
LATENCY_BATCHES = (1, 64)


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


@dataclass
class Progress:
    """What the caller is told after each member (the CLI prints it as one line)."""

    index: int
    total: int
    member: Member
    status: str  # "trained", "resumed", "reused" (finished before), or "stressed"
    metric: str  # "<task>/<metric>" of the headline
    value: float
    seconds: float


# ---------------------------------------------------------------------- parsing the command
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


MAX_SEEDS = 1000  # seeds per setting: each is a full training run


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


# ---------------------------------------------------------------------- which fusions
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
                shown = str(err).splitlines()[0]
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
        shown = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"needs tokens that {', '.join(lacking)} does not give ({shown})"
    return None


def resolve_fusions(
    names: Sequence[str], base: RunConfig, options: dict[str, dict[str, Any]] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Registered fusion names in the given order ("all": every one the encoders can feed), and the skipped ones.
    `options`: fusion -> its options from `--fusions name{...}`; a fusion given options counts as named.

    Raises:
        ConfigError: an unknown name, a named fusion the encoders cannot feed, or no fusion at all.
    """
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
    encoders = build_encoders(base.model)
    options = options or {}
    for f in options:
        if f not in wanted:
            raise ConfigError(f"--fusions: options for {f!r}, which is not one of the fusions compared")
    explicit = ({n.strip() for n in names} | set(options)) - {"all"}
    dims = {m: e.output_dim for m, e in encoders.items()}
    for f, opts in options.items():  # options that do not build are the options' fault, not the encoders'
        try:
            build_fusion(Component(**fusion_component(base.model.fusion, f, opts)), dims)
        except ConfigError as err:
            shown = yaml.safe_dump(opts, default_flow_style=True).strip()
            raise ConfigError(f"--fusions: {f}{shown}: {str(err).removeprefix('model.fusion')[1:].strip()}") from None
    kept, skipped = [], {}
    for f in wanted:
        reason = why_not_feedable(f, base.model.fusion, encoders, options.get(f))
        if reason is None:
            kept.append(f)
        elif f in explicit:
            raise ConfigError(f"--fusions: {f} cannot be used with this config's encoders: {reason}")
        else:
            skipped[f] = reason
    if not kept:
        raise ConfigError("--fusions: none of the fusions can be fed by this config's encoders")
    return kept, skipped


# ---------------------------------------------------------------------- the plan
def _read_raw(config: str | Path | None) -> dict[str, Any]:
    path = Path(config) if config is not None else default_config_path()
    return yaml.safe_load(path.read_text()) or {}


def _member_name(fusion: str, vary: dict[str, str], seed: int) -> str:
    parts = [fusion, *(f"{k}={v}" for k, v in vary.items()), f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "_".join(parts))[:150]


def _member_config(raw: dict[str, Any], fusion: dict[str, Any], vary: dict[str, str], seed: int) -> RunConfig:
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
    n_seeds = parse_seeds(seeds)
    if base.seed + n_seeds - 1 > MAX_SEED:
        raise ConfigError(f"--seeds: the config's seed {base.seed} + {n_seeds - 1} is over the largest seed {MAX_SEED}")
    axes = parse_vary(vary)
    listed, options = parse_fusions(fusions)
    names, skipped = resolve_fusions(listed, base, options)
    raw = apply_overrides(_read_raw(config), list(overrides))
    out = Path(out) if out else Path("runs") / f"compare-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out(out)
    plan = Plan(base, str(config) if config else None, list(overrides), names, skipped, axes, [], out)
    plan.seeds = [base.seed + k for k in range(n_seeds)]
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else [{}]
    for seed in plan.seeds:
        for combo in combos:
            for f in names:
                cfg = _member_config(raw, fusion_component(base.model.fusion, f, options.get(f)), combo, seed)
                name = _member_name(f, combo, seed)
                plan.members.append(Member(name, f, combo, seed, cfg, plan.out / "members" / name))
    if len({m.name for m in plan.members}) != len(plan.members):
        raise ConfigError("--vary: two values give the same member folder name; use values that differ in letters")
    return plan


# ---------------------------------------------------------------------- training the members
def _agrees(saved: Any, wanted: Any) -> bool:
    """Whether a resolved config (dumped) holds every value `wanted` sets; what training learned may be extra
    (encoder options it fitted, task classes `wanted` leaves as None)."""
    if isinstance(wanted, dict):
        return isinstance(saved, dict) and all(
            (k == "classes" and v is None) or (k in saved and _agrees(saved[k], v)) for k, v in wanted.items()
        )
    return saved == wanted


def train_member(member: Member) -> tuple[dict[str, Any], str]:
    """(The run's summary, "trained" / "resumed" / "reused"): a finished member is read back, never retrained."""
    d, resume = member.run_dir, False
    if (d / "config.yaml").exists():
        from mmfuse.config import load_config

        saved = load_config(d / "config.yaml").model_dump(mode="json")
        if not _agrees(saved, member.cfg.model_dump(mode="json")):
            raise ConfigError(f"{d}: holds a run of another config; use another --out or delete that folder")
        if (d / "metrics.json").exists():
            try:
                return json.loads((d / "metrics.json").read_text()), "reused"
            except ValueError:
                raise ConfigError(
                    f"{d / 'metrics.json'}: not valid JSON; delete it to evaluate the run again"
                ) from None
        resume = (d / "checkpoints" / "last.ckpt").exists()
    return train(member.cfg, d, resume=resume), "resumed" if resume else "trained"


def scoring_split(summary: dict[str, Any]) -> str:
    return "test" if "test" in summary["metrics"] else "val"


def primary_metrics(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """{task: {"metric": its primary metric, "higher_is_better": bool}} from a resolved config."""
    tasks = build_tasks(cfg.tasks)
    return {
        n: {"metric": t.default_metric, "higher_is_better": bool(t.metrics()[t.default_metric].higher_is_better)}
        for n, t in tasks.items()
    }


def run_compare(
    plan: Plan,
    stress: bool = False,
    stress_limit: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Train (or read back) every member, measure it, optionally stress it, and write the outputs.

    Returns:
        The result written to `OUT/compare.json`.
    """
    start = time.perf_counter()
    if stress_limit is not None and (not stress or stress_limit < 1):
        raise ConfigError(f"--stress-limit: needs --stress and a count >= 1 (got {stress_limit})")
    sweep_fn = _stress_functions()[0] if stress else None  # a missing stress module answers before training
    plan.out.mkdir(parents=True, exist_ok=True)
    rows, tasks = _train_members(plan, progress)
    if sweep_fn is not None:
        _stress_members(plan, rows, sweep_fn, stress_limit, progress)
    result = summarise(plan, rows, tasks)
    if stress:
        result["stress"] = summarise_stress(plan, rows, tasks)
    result["compare_wall_s"] = round(time.perf_counter() - start, 1)
    from mmfuse.workbench.plots import draw_all

    result["plots"] = draw_all(result, plan.out)
    write_atomic(plan.out / "compare.json", json.dumps(result, indent=2))
    write_atomic(plan.out / "compare.md", render_markdown(result))
    return result


def _train_members(
    plan: Plan, progress: Callable[[Progress], None] | None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Train (or read back) and measure every member: (one row per member, the tasks' primary metrics)."""
    rows: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(plan.members, 1):
        t0 = time.perf_counter()
        summary, status = train_member(m)
        if not summary["metrics"]:
            raise ConfigError(f"{m.run_dir}: no validation or test records to score it; set data.val_fraction")
        split = scoring_split(summary)
        tasks = tasks or primary_metrics(load_resolved(m.run_dir))
        row = _member_row(m, summary, status, split)
        row.update(measure_member(m.run_dir, plan.out / "measurements" / f"{m.name}.json"))
        rows.append(row)
        if progress is not None:
            task, spec = next(iter(tasks.items()))
            value = summary["metrics"][split][task][spec["metric"]]
            took = time.perf_counter() - t0
            progress(Progress(i, len(plan.members), m, status, f"{task}/{spec['metric']}", value, took))
    return rows, tasks


def _stress_members(
    plan: Plan,
    rows: list[dict[str, Any]],
    sweep: Callable[..., dict[str, Any]],
    limit: int | None,
    progress: Callable[[Progress], None] | None,
) -> None:
    """Add each member's sweep to its row (`row["stress"]`)."""
    for i, (m, row) in enumerate(zip(plan.members, rows), 1):
        t0 = time.perf_counter()
        cache = plan.out / "stress" / (f"{m.name}.json" if limit is None else f"{m.name}.n{limit}.json")
        row["stress"] = stress_member(sweep, m, row["split"], limit, cache)
        if progress is not None:
            progress(Progress(i, len(plan.members), m, "stressed", "", float("nan"), time.perf_counter() - t0))


def load_resolved(run_dir: Path) -> RunConfig:
    from mmfuse.config import load_config

    return load_config(run_dir / "config.yaml")


def _member_row(m: Member, summary: dict[str, Any], status: str, split: str) -> dict[str, Any]:
    timings = summary.get("timings_s", {})
    return {
        "name": m.name,
        "group": m.group,
        "fusion": m.fusion,
        "vary": dict(m.vary),
        "seed": m.seed,
        "run_dir": str(m.run_dir),
        "status": status,
        "split": split,
        "metrics": summary["metrics"][split],
        "train_s": timings.get("fit"),
        "total_s": timings.get("total"),
        "epochs": summary.get("epochs"),
    }


# ---------------------------------------------------------------------- measuring a member
def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def measure_member(run_dir: Path, cache_file: Path, repeats: dict[int, int] | None = None) -> dict[str, Any]:
    """Parameter counts and the forward latency of a finished member (read back from `cache_file` when fresh).

    Latency: the median over repeats of the trained model's forward on a batch of 1 and of 64 of its own
    evaluation records, timed from what the model trained on: cached features for the cached (frozen)
    modalities, collated inputs (through the encoder) for the others. Batching, data loading and the feature
    cache lookup are outside the timing.
    """
    metrics_file = run_dir / "metrics.json"
    if cache_file.exists() and cache_file.stat().st_mtime >= metrics_file.stat().st_mtime:
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass
    out = _measure(run_dir, repeats or {1: 30, 64: 10})
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_file, json.dumps(out, indent=2))
    return out


def _measure(run_dir: Path, repeats: dict[int, int]) -> dict[str, Any]:
    from mmfuse.runs import open_run
    from mmfuse.train.data import make_loader
    from mmfuse.train.run import Run

    loaded = open_run(run_dir)
    model, cfg = loaded.model, loaded.config
    params = count_parameters(model)
    run = Run(cfg, model)
    split = next(s for s in ("test", "val", "train") if run.splits.get(s))
    records = run.splits[split]
    size = max(LATENCY_BATCHES)
    records = (records * (size // len(records) + 1))[:size]
    run.splits = {split: records}
    feats = run.prepare()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "cpu")
    model = model.to(device).eval()
    latency: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, a thread pool makes the time mostly the scheduler's
    try:
        for b in LATENCY_BATCHES:
            opts = replace(run.loader_options, eval_batch_size=b, num_workers=0)
            batch = next(iter(make_loader(model, records, split, feats, opts)))
            latency[str(b)] = round(_median_ms(model, batch, device, repeats[b]), 4)
    finally:
        torch.set_num_threads(threads)
    sources = {m: "cached features" if m in feats.tables else "inputs" for m in model.encoders}
    shown = str(device) if device.type == "cuda" else "cpu, 1 thread"
    return {"params": params, "latency_ms": latency, "latency_from": sources, "latency_device": shown}


@torch.inference_mode()
def _median_ms(model: torch.nn.Module, batch: dict[str, Any], device: torch.device, repeats: int) -> float:
    """Median forward time (ms) over at least `repeats` timed passes and at least 0.2 s (at most 2,000 passes)."""
    from mmfuse.utils import move_to

    inputs, features = move_to(batch["inputs"], device), move_to(batch.get("features") or {}, device)
    for _ in range(3):  # warm-up
        model(inputs, features)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < 0.2 and len(times) < 2000):
        t0 = time.perf_counter()
        model(inputs, features)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


# ---------------------------------------------------------------------- stress
def _stress_functions() -> tuple[Callable[..., dict[str, Any]], Callable[..., dict[str, Any]]]:
    """`sweep` and `robustness` of `mmfuse.workbench.stress` (one ConfigError line when it is not there)."""
    try:
        mod = importlib.import_module("mmfuse.workbench.stress")
    except ImportError as err:
        raise ConfigError(f"--stress needs mmfuse.workbench.stress, which cannot be imported ({err})") from None
    return mod.sweep, mod.robustness


def stress_member(
    sweep: Callable[..., dict[str, Any]], m: Member, split: str, limit: int | None, cache_file: Path
) -> dict[str, Any]:
    """The member's sweep (read back from `cache_file` when it is newer than the member's metrics)."""
    if cache_file.exists() and cache_file.stat().st_mtime >= (m.run_dir / "metrics.json").stat().st_mtime:
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass
    result = sweep(m.run_dir, split=split, seed=m.seed, limit=limit)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_file, json.dumps(result, indent=2))
    return result


def _flat(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a/b": value}."""
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return {prefix: float(d)}
    if isinstance(d, dict):
        out: dict[str, float] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {}


def summarise_stress(plan: Plan, rows: list[dict[str, Any]], tasks: dict[str, Any]) -> dict[str, Any]:
    """Per group: each condition's metrics and the robustness figures, mean and std over seeds.

    The figures come from `stress.robustness({setting: sweep})` over the settings of one seed (effective
    robustness is relative to a baseline setting: the first `concat` one, as late fusion in MultiBench), then
    each figure's mean and std over seeds.
    """
    robustness = _stress_functions()[1]
    by_group = _by_group(rows)
    baseline = next((label for label, ms in by_group.items() if ms[0]["fusion"] == "concat"), None)
    figures: dict[str, list[dict[str, float]]] = {label: [] for label in by_group}
    for seed in plan.seeds:
        sweeps = {label: r["stress"] for label, ms in by_group.items() for r in ms if r["seed"] == seed}
        for label, figs in robustness(sweeps, baseline=baseline).items():
            figures[label].append(_flat(figs))
    groups: dict[str, Any] = {}
    for label, members in by_group.items():
        curves: dict[tuple[str, str, float], list[dict[str, float]]] = {}
        for r in members:
            for c in r["stress"]["conditions"]:
                curves.setdefault((c["modality"], c["kind"], float(c["severity"])), []).append(c["metrics"])
        groups[label] = {
            "conditions": [
                {"modality": mod, "kind": kind, "severity": sev, "metrics": _stats_of(ms)}
                for (mod, kind, sev), ms in sorted(curves.items())
            ],
            "clean": _stats_of([r["stress"]["clean"] for r in members]),
            "robustness": _stats_of(figures[label]),
        }
    return {"baseline": baseline, "groups": groups}


def _stats_of(dicts: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    keys = [k for k in dicts[0] if all(k in d for d in dicts)] if dicts else []
    return {k: stats([float(d[k]) for d in dicts]) for k in keys}


# ---------------------------------------------------------------------- summary
def stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value) and the values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "per_seed": values,
    }


def _by_group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return groups


def summarise(plan: Plan, rows: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison's JSON: settings, every member, and per group every metric's mean and std over seeds."""
    groups = []
    for label, members in _by_group(rows).items():
        metrics = {
            t: {k: stats([r["metrics"][t][k] for r in members]) for k in members[0]["metrics"][t]}
            for t in members[0]["metrics"]
        }
        groups.append(
            {
                "label": label,
                "fusion": members[0]["fusion"],
                "vary": members[0]["vary"],
                "members": [r["name"] for r in members],
                "metrics": metrics,
                "params": members[0]["params"],
                "train_s": stats([r["train_s"] for r in members if r["train_s"] is not None] or [float("nan")]),
                "latency_ms": {b: stats([r["latency_ms"][b] for r in members]) for b in members[0]["latency_ms"]},
            }
        )
    splits = sorted({r["split"] for r in rows})
    result = {
        "config": plan.base.name,
        "config_path": plan.config_path,
        "overrides": plan.overrides,
        "fusions": plan.fusions,
        "skipped": plan.skipped,
        "vary": plan.vary,
        "seeds": plan.seeds,
        "epochs": plan.base.train.max_epochs,
        "split": splits[0] if len(splits) == 1 else splits,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "tasks": tasks,
        "latency_from": rows[0]["latency_from"],
        "latency_device": rows[0]["latency_device"],
        "groups": groups,
        "members": rows,
    }
    result["picks"] = pick_members(result)
    return result


def _fmt(s: dict[str, Any], digits: int = 4) -> str:
    mean, std = s["mean"], s["std"]
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_markdown(result: dict[str, Any]) -> str:
    """compare.md: the settings, one row per group, the plots, and the stress results when present."""
    tasks = result["tasks"]
    over = ", ".join(f"`{o}`" for o in result["overrides"]) or "none"
    vary = "; ".join(f"`{k}` = {', '.join(v)}" for k, v in result["vary"].items()) or "nothing"
    sources = ", ".join(f"{m}: {s}" for m, s in result["latency_from"].items())
    head = ["setting", *(f"{t} {s['metric']} {'↑' if s['higher_is_better'] else '↓'}" for t, s in tasks.items())]
    head += ["params trainable / total", "train (s)", "latency b=1 (ms)", "latency b=64 (ms)"]
    lines = [
        f"# Fusion comparison on `{result['config']}`",
        "",
        f"- config: `{result['config']}` ({result['config_path'] or 'built-in'}); overrides: {over}",
        f"- fusions: {', '.join(result['fusions'])}; varied: {vary}",
        f"- budget: {result['epochs']} epochs for every member; seeds: {', '.join(map(str, result['seeds']))}",
        f"- metrics: each task's primary metric on the {result['split']} split, mean ± std over seeds",
        f"- date: {result['date']}; this command: {result['compare_wall_s'] / 60:.1f} min (finished members read back)",
    ]
    lines += [f"- skipped {f}: {why}" for f, why in result["skipped"].items()]
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for g in result["groups"]:
        cells = [g["label"], *(_fmt(g["metrics"][t][s["metric"]]) for t, s in tasks.items())]
        cells += [f"{g['params']['trainable']:,} / {g['params']['total']:,}", _fmt(g["train_s"], 1)]
        cells += [_fmt(g["latency_ms"][str(b)], 3) for b in LATENCY_BATCHES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Train: the `fit` time of each member's run (a resumed member: only its last session). Latency: median "
        f"of repeated forwards of the trained model on {result['latency_device']}, from {sources} (data loading "
        "and the feature-cache lookup excluded), then mean ± std over seeds. Times depend on the machine's load.",
        "",
    ]
    lines += pick_markdown(result["picks"]) if "picks" in result else []
    lines += [f"![{t}]({p})" for t, p in result["plots"].get("bars", {}).items()]
    if "stress" in result:
        lines += ["", *_stress_markdown(result)]
    lines += ["", "Members (run folders):", ""]
    lines += [f"- `{r['name']}` ({r['status']}): {r['run_dir']}" for r in result["members"]]
    return "\n".join(lines) + "\n"


def _stress_markdown(result: dict[str, Any]) -> list[str]:
    """Per figure, a table: one row per (modality/kind, task's primary metric), one column per setting."""
    groups = result["stress"]["groups"]
    heads = [f"{t}/{s['metric']}" for t, s in result["tasks"].items()]
    labels = list(groups)
    lines = ["## Robustness", ""]
    for figure, what in (
        ("relative_robustness", "area under the metric-vs-severity curve"),
        ("effective_robustness", f"drop from clean compared with the baseline `{result['stress']['baseline']}`"),
    ):
        keys = sorted({k for g in groups.values() for k in g["robustness"] if k.endswith("/" + figure)})
        rows = [k for k in keys if any(k.endswith(f"/{h}/{figure}") for h in heads)]
        if not rows:
            continue
        lines += [f"{figure.replace('_', ' ')} ({what}; mean ± std over seeds):", ""]
        lines += ["| imperfection / metric | " + " | ".join(labels) + " |", "|---" + "|---:" * len(labels) + "|"]
        for k in rows:
            cells = [_fmt(groups[g]["robustness"][k]) if k in groups[g]["robustness"] else "" for g in labels]
            lines.append(f"| {k.removesuffix('/' + figure)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{name}]({p})" for name, p in result["plots"].get("stress", {}).items()]
    return lines
