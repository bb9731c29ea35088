"""Typed run configuration and the builders that turn it into objects (the only reader of config).

A run is one YAML file with the sections `model`, `tasks`, `data`, `train` (see configs/). Every
key is validated: an unknown key, a wrong type or a value out of range is one `ConfigError` line naming the key.
Components are chosen by registry name (`fusion: {name: film, ...}`); their other keys are checked
against the registered class's signature, so a config can never run arbitrary code, and each numeric option is
range-checked by its name (`option_range`: sizes >= 1, rates in [0, 1), seeds in [0, 2**32 - 1], ...).
No float anywhere may be NaN or infinite.
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)

from mmfuse.files import NotRegularFileError, open_regular
from mmfuse.registry import Registry, known_names
from mmfuse.text import one_line


class ConfigError(ValueError):
    """A config problem, as one line that names the key."""


MAX_SIZE = 2**20  # the largest size (a width, a length, a count of heads or layers) a config may ask for
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Component(BaseModel):
    """`{name: registry_name, **options}`; options are checked against the registered class."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EncoderConfig(Component):
    """`{name: registry_name, field: record_field, **options}` for one modality."""

    field: str | None = None  # the record field (or field prefix) the encoder reads; default: the modality's name


class HeadConfig(_Strict):
    hidden_dims: list[Annotated[int, Field(ge=1, le=MAX_SIZE)]] = Field(default_factory=list)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ModelConfig(_Strict):
    encoders: dict[str, EncoderConfig] = Field(min_length=1)
    fusion: Component
    head: HeadConfig = Field(default_factory=HeadConfig)


class TaskConfig(BaseModel):
    """`{kind: registry_name, field:, weight:, classes:, **options}`; options are checked against the kind."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    kind: str
    classes: list[str] | None = None
    weight: float = Field(1.0, ge=0.0)
    field: str | None = None  # record field holding the label; default: the task's name

    @property
    def options(self) -> dict[str, Any]:
        """Kind-specific options (e.g. `loss` of a regression); None values are left out."""
        return {k: v for k, v in (self.model_extra or {}).items() if v is not None}


class DataConfig(_Strict):
    source: Literal["easy_vqa", "records", "shards"] = "easy_vqa"  # shards: a folder written by `mmfuse pack`
    path: str | None = None
    train: str | None = None
    val: str | None = None
    test: str | None = None
    root: str | None = Field(None, validation_alias=AliasChoices("root", "image_root"))
    allow_outside_root: bool = False
    split_field: str = "split"
    group_by: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    num_workers: int | None = Field(None, ge=0)
    skip_bad: bool = False
    bucket_by_length: bool = True
    # Training batches keep the records sharing an input (an image) together, so a fine-tuned encoder runs once
    # per distinct input: faster, same gradient summed over an epoch, noisier batches (mmfuse.data.grouping).
    group_batches: bool = False


def _not_bool(value: Any) -> Any:
    """A number of seconds or a delta is never `true`/`false` (which pydantic would read as 1/0)."""
    if isinstance(value, bool):
        from pydantic_core import PydanticCustomError

        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


# a float that refuses booleans; a string such as "1e-3" (YAML 1.1 reads it as text) is read as a number
Number = Annotated[float, BeforeValidator(_not_bool)]


class EarlyStoppingConfig(_Strict):
    """Stop after `patience` epochs without an improvement of `train.monitor` greater than `min_delta`."""

    patience: int = Field(3, ge=1, strict=True)  # epochs (Lightning's default)
    min_delta: Number = Field(0.0, ge=0)  # in the monitored metric's units


class TrainConfig(_Strict):
    max_epochs: int = Field(10, gt=0)
    early_stopping: EarlyStoppingConfig | None = None  # null: train for max_epochs
    time_limit: Number | None = None  # seconds of this session's fit; checked at each epoch end
    lr: float = Field(1e-3, gt=0)
    encoder_lr: float = Field(1e-5, ge=0)
    # Layer-wise lr decay (BEiT, ELECTRA): an encoder's block at depth k from the top gets encoder_lr * layer_decay**k.
    layer_decay: float = Field(1.0, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: with `momentum`, as in the OGM-GE paper
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, ge=0)  # 0 or null: no clipping
    deterministic: bool = True
    # What is tested: 16-mixed on a GPU (on the CPU Lightning runs it as bf16-mixed, with a warning).
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = 1
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true"] = "auto"
    num_nodes: int = Field(1, gt=0, strict=True)
    monitor: str | None = None
    weighting: Component = Field(default_factory=lambda: Component(name="equal"))
    balance: Component | None = None
    cache: bool = True
    cache_dir: str | None = None
    compile: bool = False
    log_every_n_steps: int = Field(20, gt=0)
    progress_bar: bool = True
    checkpoint_every_n_steps: int | None = Field(None, gt=0)  # also write last.ckpt every N steps (None: epochs only)
    # Optimiser steps taken per Lightning training step when the training split comes all from the feature cache:
    # each one a whole step of its own batch (the same batches, order and results as 1), Lightning's per-batch loop
    # paid once for them. auto: 4 there (1 with checkpoint_every_n_steps), 1 elsewhere.
    steps_per_call: Literal["auto"] | int = "auto"

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_alias(cls, value: Any) -> Any:
        """Lightning's short names: 32 -> 32-true, 16 -> 16-mixed, bf16 -> bf16-mixed."""
        return _PRECISION_ALIASES.get(str(value), value) if isinstance(value, (int, str)) else value

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError("time_limit", "must be > 0 seconds")
        return value

    @field_validator("steps_per_call", mode="before")
    @classmethod
    def _steps_per_call(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        if value != "auto" and (type(value) is not int or value < 1):
            raise ValueError("expected 'auto' or a count >= 1")
        if value != "auto" and value > 1 and info.data.get("checkpoint_every_n_steps"):
            raise ValueError(
                "more than 1 step per Lightning step cannot be counted by checkpoint_every_n_steps: use 1 or auto"
            )
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        if isinstance(value, int) and (value >= 1 or value == -1):
            return value
        if isinstance(value, str) and (value == "auto" or _is_device_list(value)):
            return value
        raise ValueError("expected a count >= 1, -1 (all), 'auto', or device indices such as '0,1'")


_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def _is_device_list(text: str) -> bool:
    parts = [p.strip() for p in text.split(",")]
    return all(p.isdigit() for p in parts if p) and any(parts)


RUN_NAME_MAX = 100


class RunConfig(_Strict):
    name: str = "run"  # one folder name: the default run directory is runs/<name>-<date>-<time>
    seed: int = Field(0, ge=0, le=MAX_SEED)
    model: ModelConfig
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @pydantic.field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        """The name becomes a folder under runs/: no path separators, no '.'/'..', nothing hidden."""
        from pydantic_core import PydanticCustomError

        try:
            check_run_name(name)
        except ValueError as err:
            raise PydanticCustomError("run_name", str(err)) from None
        return name


def check_run_name(name: str) -> None:
    """Raise ValueError unless `name` is a plain folder name (ASCII letters, digits, '.', '_', '-', '+')."""
    if not name or len(name) > RUN_NAME_MAX or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise ValueError(
            f"a run name is one folder name of 1-{RUN_NAME_MAX} characters: ASCII letters, digits, "
            "'.', '_', '-', '+', starting with a letter or digit (it names runs/<name>-<date>-<time>)"
        )


def shown_key(key: str) -> str:
    """A key as it can appear in a one-line message: as is, or its repr when it holds a newline or control."""
    return key if key.isprintable() else repr(key)


def _first_error(err: ValidationError, prefix: str = "") -> ConfigError:
    e = err.errors()[0]
    key = shown_key(".".join(str(p) for p in (prefix, *e["loc"]) if p != ""))
    if e["type"] == "extra_forbidden":
        return ConfigError(f"{key}: unknown key")
    shown = repr(e.get("input"))[:80]
    return ConfigError(f"{key}: {e['msg']} (got {shown})")


def _unknown_key_error(err: ConfigError, model: type[BaseModel], data: Mapping[str, Any]) -> ConfigError:
    """Add the allowed keys to an 'unknown key' error."""
    msg = str(err)
    if not msg.endswith("unknown key"):
        return err
    node: Any = model
    skip = False  # the next part is a user's key in a dict of sections (e.g. a task name)
    for part in msg.split(":")[0].split(".")[:-1]:
        if skip:
            skip = False
            continue
        field = getattr(node, "model_fields", {}).get(part)
        node = field.annotation if field else None
        if isinstance(node, types.UnionType):  # an optional section (`EarlyStoppingConfig | None`)
            node = next((a for a in typing.get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if node is not None and typing.get_origin(node) is dict:
            node, skip = typing.get_args(node)[1], True
    if isinstance(node, type) and issubclass(node, BaseModel):
        return ConfigError(f"{msg}; allowed: {', '.join(node.model_fields)}")
    return err


_LEGACY_FIELDS = {"image_field": "image", "text_field": "text"}


def _migrate_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """Configs written before the modality-generic data path (mmfuse 0.1 run directories) named the
    record fields in `data.image_field` / `data.text_field`; they become `model.encoders.<m>.field`."""
    data = dict(data)
    section = data.get("data")
    if not isinstance(section, dict) or not any(k in section for k in _LEGACY_FIELDS):
        return data
    section = dict(section)
    model = data.get("model")
    encoders = model.get("encoders") if isinstance(model, dict) else None
    for key, modality in _LEGACY_FIELDS.items():
        if key not in section:
            continue
        value = section.pop(key)
        if not isinstance(encoders, dict) or not isinstance(encoders.get(modality), dict):
            continue  # the run has no such encoder: the old key named a field nothing reads
        if "field" not in encoders[modality]:
            encoders[modality] = {**encoders[modality], "field": value}
    data["data"] = section
    return data


def parse_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a plain dict (from YAML) into a RunConfig, and check every component's options."""
    data = _migrate_legacy(data)
    try:
        cfg = RunConfig.model_validate(dict(data))
    except ValidationError as err:
        raise _unknown_key_error(_first_error(err), RunConfig, data) from None
    _check_components(cfg)
    return cfg


# ---------------------------------------------------------------- component options
# Arguments that builders derive from other objects, never written in a config.
_DERIVED = {"self", "name", "input_dims", "tasks", "modalities", "input_dim", "args", "kwargs"}


def component_options(registry: Registry[Any], comp: Component, key: str) -> dict[str, Any]:
    """Validate `comp`'s options against the registered class's `__init__` and return them typed."""
    try:
        cls = registry.get(comp.name)
    except KeyError:
        raise ConfigError(
            f"{key}.name: unknown {registry.kind} {comp.name!r}; choose one of: {', '.join(registry.names())}"
        ) from None
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.name in _DERIVED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    model = create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)
    try:
        opts = model.model_validate(comp.options)
    except ValidationError as err:
        e = err.errors()[0]
        if e["type"] == "extra_forbidden":
            raise ConfigError(
                f"{shown_key(key + '.' + str(e['loc'][0]))}: unknown option for {registry.kind} {comp.name!r}; "
                f"allowed: {', '.join(fields)}"
            ) from None
        raise _first_error(err, key) from None
    values = {k: getattr(opts, k) for k in comp.options}
    for name, value in values.items():
        check_option_range(f"{key}.{name}", name, value)
    return values


# ---------------------------------------------------------------- ranges of numeric options, by name
# (low, high, what) per option name; the first rule whose pattern matches the whole name applies.
_RANGES: list[tuple[str, float, float, str]] = [
    (r"seed", 0, MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
    (r"ffn_factor|temperature|tol", 0, math.inf, "a number > 0"),
    (r"layers|unfreeze|stage|\w*_epoch", 0, MAX_SIZE, f"an integer from 0 to {MAX_SIZE}"),
    (r"dropout", 0, 1, "a rate in [0, 1)"),
    (r"p", 0, 1, "a probability in [0, 1]"),
    (r"max_\w+_pairs", 1, 2**40, f"an integer from 1 to {2**40}"),
    (
        r"(\w*_)?(dim|dims|size|length|width|depth|heads|rank|factor|stride|project|grid|count|channels|layers)"
        r"|num_\w+",
        1,
        MAX_SIZE,
        f"an integer from 1 to {MAX_SIZE}",
    ),
    (r"alpha|c|max_coeff|min_weight|weights?", 0, math.inf, "a number >= 0"),
]
_OPEN_ABOVE = {"dropout", "ffn_factor", "temperature", "tol"}  # > 0 or < 1: the bound itself is refused
FREE_OPTIONS = {"init_log_var", "stats"}  # numbers of any finite value (a log-variance; learned statistics)


def option_range(name: str) -> tuple[float, float, str] | None:
    """(low, high, description) for a numeric option named `name`, or None when no rule names it."""
    for pattern, low, high, what in _RANGES:
        if re.fullmatch(pattern, name):
            return low, high, what
    return None


def check_option_range(key: str, name: str, value: Any) -> None:
    """Raise ConfigError (naming `key`) when a number in `value` (a number, or a list/tuple/dict of them) is out of
    the range `option_range(name)` gives it."""
    rule = option_range(name)
    if rule is None:
        return
    low, high, what = rule
    for number in _numbers(value):
        bad = not low <= number <= high
        bad |= name in _OPEN_ABOVE and number == (high if name == "dropout" else low)
        if bad:
            raise ConfigError(f"{shown_key(key)}: must be {what} (got {number!r})")


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [n for v in value for n in _numbers(v)]
    return []


def check_name(name: str, key: str, what: str) -> None:
    """A task or modality name must be usable as a module key: not empty, no ".", not a torch.nn.Module attribute."""
    from torch import nn

    if not name or "." in name or hasattr(nn.ModuleDict(), name):
        keep = f" and set field: {name!r} to keep reading the same field" if name else ""
        raise ConfigError(
            f"{shown_key(key)}: {what} name {name!r} cannot name a module (empty, a '.', or a torch.nn.Module "
            f"attribute such as train/to/type); rename it{keep}"
        )


def _check_component_names(cfg: RunConfig) -> None:
    """Every component name against the registered names, without importing any implementation (fast errors)."""
    for modality, enc in cfg.model.encoders.items():
        _check_known("encoder", enc.name, f"model.encoders.{modality}.name")
    for name, tc in cfg.tasks.items():
        _check_known("task kind", tc.kind, f"tasks.{name}.kind")
        if "name" in tc.options:  # (a task is named by its key; `name` would clash with the kind's name)
            raise ConfigError(f"tasks.{name}.name: unknown key; a task is named by its key and its kind by `kind`")
    _check_known("fusion", cfg.model.fusion.name, "model.fusion.name")
    _check_known("weighting", cfg.train.weighting.name, "train.weighting.name")
    weighted = [n for n, t in cfg.tasks.items() if t.weight != 1.0]
    if weighted and cfg.train.weighting.name not in ("equal", "static"):
        raise ConfigError(
            f"tasks.{weighted[0]}.weight: per-task weights apply to the equal/static weightings, "
            f"not {cfg.train.weighting.name!r}"
        )
    if cfg.train.balance is not None:
        _check_known("balancer", cfg.train.balance.name, "train.balance.name")


def _check_known(kind: str, name: str, key: str) -> None:
    names = known_names(kind)
    if name not in names:
        raise ConfigError(f"{shown_key(key)}: unknown {kind} {name!r}; choose one of: {', '.join(names)}")


def _check_components(cfg: RunConfig) -> None:
    """Names first (no imports), then each component's options against its class (imports the registries)."""
    _check_component_names(cfg)
    from mmfuse.balance import BALANCERS
    from mmfuse.encoders import ENCODERS
    from mmfuse.fusion import FUSIONS
    from mmfuse.mtl import WEIGHTINGS
    from mmfuse.tasks import TASK_KINDS

    for modality, enc in cfg.model.encoders.items():
        check_name(modality, f"model.encoders.{modality}", "modality")
        component_options(ENCODERS, enc, f"model.encoders.{modality}")
    for name, tc in cfg.tasks.items():
        check_name(name, f"tasks.{name}", "task")
        component_options(TASK_KINDS, Component(name=tc.kind, **tc.options), f"tasks.{name}")
    component_options(FUSIONS, cfg.model.fusion, "model.fusion")
    component_options(WEIGHTINGS, cfg.train.weighting, "train.weighting")
    if cfg.train.balance is not None:
        component_options(BALANCERS, cfg.train.balance, "train.balance")


# ---------------------------------------------------------------- loading and overrides
def default_config_path() -> Path:
    return Path(str(resources.files("mmfuse") / "configs" / "easy_vqa.yaml"))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides (values parsed as YAML) to a nested dict, in place.

    Raises:
        ConfigError: one line naming the override: no `=`, an empty key or key part (`a..b`),
            a part that is not a section, or a value that is not valid YAML.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_epochs=3")
        parts = [part.strip() for part in key.split(".")]
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty part in the key {key!r}; write dotted keys as train.max_epochs")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is None:  # a null section (`early_stopping: null` in a saved config.yaml) gets its first key
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _override_value(item, raw)
    return data


def _override_value(item: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({one_line(err)}); quote it, e.g. 'a.b=\"text\"'"
        ) from None
    except RecursionError:
        raise ConfigError(f"--set {item!r}: the value is nested too deeply") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (the built-in easy-VQA one when `path` is None) and validate it."""
    path = Path(path) if path is not None else default_config_path()
    try:
        with open_regular(path, "config file") as f:  # a FIFO or device would block the read forever
            data = yaml.safe_load(f.read().decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except NotRegularFileError as err:
        raise ConfigError(f"{path}: {str(err).replace(f'config file {path} ', '', 1)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (model, tasks, data, train)")
    return parse_config(apply_overrides(data, overrides or []))


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path if it looks like a finished run (config.yaml and model.safetensors); reads neither.

    Raises:
        ConfigError: a file instead of a directory, or a directory without those two files.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ConfigError(f"{run_dir}: pass the run directory (it holds config.yaml and model.safetensors)")
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).exists():
            raise ConfigError(f"{run_dir}: not a finished run directory ({name} is missing)")
    return run_dir


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=False), sort_keys=False)
