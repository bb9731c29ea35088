"""Stress a finished run: evaluate it with a modality absent or its raw inputs corrupted at graded severities.

A condition is (modality, kind, severity) (`mmfuse.workbench.corrupt` lists the kinds). A corruption acts on
the raw input before encoding (`encoder.load` -> corrupt -> `encoder.preprocess` -> the run's own encoder),
so features cached for the clean inputs are never reused for corrupted ones: the corrupted modality's
distinct inputs are encoded again, in memory, and every other modality keeps its clean (cached) features.
`absent` marks records as lacking the modality through the model's own missing-modality path (the batch's
`absent` mask: exact zeros, no attention key), which every registered fusion accepts. Severity 0 is the
identity, so a condition at severity 0 is the clean evaluation itself.

The metrics are those of `mmfuse evaluate` (the same loader and Lightning test loop), deterministic given
`seed`. Only the CLI prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmfuse.config import ConfigError
from mmfuse.data.cache import FeatureCache, FeatureTable, encode_rows, encoder_key
from mmfuse.data.collate import merge_absent
from mmfuse.io import sha256_text
from mmfuse.workbench.corrupt import CORRUPTIONS, absent_mask, kinds_for, rng_for
from mmfuse.workbench.robustness import robustness  # noqa: F401  (part of this module's interface)

DEFAULT_SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
ENCODE_BATCH = 32


class StressError(ConfigError):
    """A condition that cannot be evaluated (unknown modality or kind, severity out of range), as one line."""


@dataclass(frozen=True)
class Condition:
    """One corruption: `kind` of `modality`'s inputs at `severity` in [0, 1]."""

    modality: str
    kind: str
    severity: float
    option: str = field(default="--corrupt", compare=False)  # how the user gave it, for messages

    def __str__(self) -> str:
        if self.option == "--drop":
            return self.modality
        return f"{self.modality}={self.kind}:{self.severity:g}"


def parse_condition(text: str) -> Condition:
    """'MODALITY=KIND:SEVERITY' (e.g. 'image=noise:0.1') -> Condition; the kind and range are checked here,
    the modality against a run by `Stress.check`."""
    modality, eq, rest = text.partition("=")
    kind, colon, level = rest.partition(":")
    if not (eq and colon and modality.strip() and kind.strip() and level.strip()):
        raise StressError(f"--corrupt {text!r}: expected MODALITY=KIND:SEVERITY, e.g. image=noise:0.1")
    try:
        severity = float(level)
    except ValueError:
        raise StressError(f"--corrupt {text!r}: severity {level!r} is not a number") from None
    return check_kind_and_severity(Condition(modality.strip(), kind.strip(), severity))


def drop_condition(modality: str) -> Condition:
    """`--drop MODALITY`: the modality absent from every record (`absent` at severity 1)."""
    return Condition(modality.strip(), "absent", 1.0, "--drop")


def check_kind_and_severity(cond: Condition) -> Condition:
    option = cond.option
    if cond.kind not in CORRUPTIONS:
        raise StressError(f"{option} {cond}: unknown corruption kind {cond.kind!r} (kinds: {', '.join(CORRUPTIONS)})")
    if not (math.isfinite(cond.severity) and 0.0 <= cond.severity <= 1.0):
        raise StressError(f"{option} {cond}: severity {cond.severity:g} is out of range [0, 1]")
    return cond


class Stress:
    """A finished run opened once for evaluation under many conditions (clean features built once).

    Args:
        run_dir: the run directory (config.yaml + model.safetensors).
        split: the split to evaluate.
        overrides: `--set data.*` overrides, as for `mmfuse evaluate`.
        limit: evaluate only the first `limit` records of the split.
        seed: the seed of every corruption draw.
        conditions: checked (`check`) as soon as the model is built, before any record is read.
    """

    def __init__(
        self,
        run_dir: str | Path,
        split: str = "test",
        overrides: Sequence[str] | None = None,
        limit: int | None = None,
        seed: int = 0,
        conditions: Sequence[Condition] = (),
    ) -> None:
        from mmfuse.config import load_config
        from mmfuse.runs import load_run
        from mmfuse.train.run import Run, eval_trainer, only_split

        run_dir = Path(run_dir)
        self.model = load_run(run_dir)
        for c in conditions:
            self.check(c)
        cfg = load_config(run_dir / "config.yaml", list(overrides or []))
        run = Run(cfg, self.model)
        only_split(run, run_dir, split)
        if limit is not None and limit < 1:
            raise StressError(f"limit must be at least 1, got {limit}")
        run.splits = {split: run.splits[split][:limit]}
        self.features = run.prepare()  # validates the records; clean features of the cached modalities
        self.split, self.seed, self.records = split, int(seed), run.splits[split]
        self.cache_dir = run.loader_options.cache_dir
        self.options = run.loader_options
        self.module = run.module()
        self.trainer = eval_trainer(run.options.accelerator)

    # ------------------------------------------------------------------ conditions
    def kinds(self, modality: str) -> list[str]:
        """The corruption kinds that apply to a modality of this run (by its encoder's input kind)."""
        return kinds_for(self.model.encoders[modality].modality)

    def check(self, cond: Condition) -> Condition:
        """The condition, if this run can be evaluated under it; else StressError naming what is wrong."""
        check_kind_and_severity(cond)
        option = cond.option
        if cond.modality not in self.model.encoders:
            raise StressError(
                f"{option} {cond}: the run has no modality {cond.modality!r} (modalities: "
                f"{', '.join(self.model.encoders)})"
            )
        if cond.kind not in self.kinds(cond.modality):
            input_kind = self.model.encoders[cond.modality].modality or "unknown"
            raise StressError(
                f"{option} {cond}: {cond.kind!r} does not apply to {cond.modality!r} (a {input_kind} input; "
                f"kinds for it: {', '.join(self.kinds(cond.modality))})"
            )
        return cond

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, conditions: Sequence[Condition] = ()) -> dict[str, dict[str, float]]:
        """Per-task metrics {task: {metric: value}} with every condition applied at once (none: clean).

        Several corruptions of one modality are applied in the given order; `absent` composes with any.
        """
        from mmfuse.train.data import make_loader
        from mmfuse.train.run import evaluate_module

        conditions = [self.check(c) for c in conditions]
        features, absent = self.stressed_features(conditions)
        loader = make_loader(self.model, self.records, self.split, features, self.options)
        if absent:
            loader.collate_fn = WithAbsent(loader.collate_fn, absent)
        return evaluate_module(self.trainer, self.module, loader, "test" if self.split == "test" else "val")

    def stressed_features(self, conditions: Sequence[Condition]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The loader's `Features` under `conditions`, and {modality: (N,) bool} records that lack it.

        Identity conditions (severity 0) change nothing. A corrupted modality's features are encoded again from
        its corrupted raw inputs; the other modalities keep the clean ones.
        """
        from mmfuse.train.data import Features

        active = [c for c in conditions if c.severity > 0]
        tables = dict(self.features.tables)
        rows = {s: dict(r) for s, r in self.features.rows.items()}
        rows.setdefault(self.split, {})
        absent: dict[str, torch.Tensor] = {}
        for modality in dict.fromkeys(c.modality for c in active if c.kind != "absent"):
            chain = [c for c in active if c.modality == modality and c.kind != "absent"]
            table, rows[self.split][modality], missing = self.encode_corrupted(modality, chain)
            tables[modality] = table
            if bool(missing.any()):
                absent[modality] = missing
        for c in active:
            if c.kind == "absent":
                absent = merge_absent(absent, {c.modality: absent_mask(len(self.records), c.severity, self.seed)})
        return Features(tables, rows), absent

    @torch.inference_mode()
    def encode_corrupted(self, modality: str, chain: Sequence[Condition]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Encode the split's distinct inputs of `modality` after the corruptions of `chain`.

        Where the run caches the modality's clean features (a frozen encoder, `train.cache` on), what is encoded
        goes to the feature cache too, under a key of its own per corruption chain and seed (`CorruptedCache`):
        another run with the same encoder (the members of `mmfuse compare`) or a second sweep reads it back.
        Otherwise (a fine-tuned encoder, the cache off) it is encoded in memory each time.

        Returns:
            (FeatureTable of the distinct inputs, (N,) long row of each record, (N,) bool records without one).
        """
        enc = self.model.encoders[modality]
        refs = [r.inputs.get(modality) for r in self.records]
        distinct = list(dict.fromkeys(r for r in refs if r is not None))
        if not distinct:
            raise StressError(f"--corrupt {chain[0]}: no record of the {self.split!r} split has a {modality!r} input")
        missing = torch.tensor([r is None for r in refs], dtype=torch.bool)
        keep_tokens = self.model.fusion.needs_tokens and enc.has_tokens
        if modality in self.features.tables:
            cache = CorruptedCache(enc, modality, chain, self.seed, self.corrupt_raw, self.cache_dir, keep_tokens)
            table, rows = cache.build([r if r is not None else distinct[0] for r in refs], batch_size=ENCODE_BATCH)
            return table, rows, missing
        row_of = {ref: i for i, ref in enumerate(distinct)}
        rows = torch.tensor([row_of.get(r, 0) for r in refs], dtype=torch.long)
        was_training = enc.training
        enc.eval()
        try:
            shard = encode_rows(
                enc, distinct, lambda ref: self.corrupt_raw(enc, ref, chain), ENCODE_BATCH, keep_tokens, modality
            )
        finally:
            enc.train(was_training)
        loc = torch.stack([torch.zeros(len(distinct), dtype=torch.long), torch.arange(len(distinct))], dim=1)
        return FeatureTable([shard], loc), rows, missing

    def corrupt_raw(self, enc: Any, ref: Any, chain: Sequence[Condition]) -> Any:
        """`enc.load(ref)` after each corruption of `chain`, each drawn from (seed, kind, content hash)."""
        raw, content = enc.load(ref), enc.content_hash(ref)
        for c in chain:
            raw = CORRUPTIONS[c.kind].fn(raw, c.severity, rng_for(self.seed, c.kind, content))
        return raw

    def higher_is_better(self) -> dict[str, bool]:
        """{"<task>/<metric>": whether higher is better} for every metric of every task."""
        return {
            f"{name}/{metric}": bool(m.higher_is_better)
            for name, task in self.model.tasks.items()
            for metric, m in task.metrics().items()
        }


class CorruptedCache(FeatureCache):
    """The feature cache of a frozen encoder's outputs on *corrupted* inputs: a `FeatureCache` whose folder is
    keyed by the encoder, the corruption chain and the seed (never the clean features' folder), and which
    corrupts each input as it loads it. Corruptions are drawn from (seed, kind, content hash), so a cached
    row is exactly what encoding again would give.

    Args:
        corrupt: `(encoder, reference, chain) -> raw input`, the loaded and corrupted input.
        Others: as for `FeatureCache`.
    """

    def __init__(
        self,
        encoder: Any,
        modality: str,
        chain: Sequence[Condition],
        seed: int,
        corrupt: Callable[[Any, Any, Sequence[Condition]], Any],
        root: str | Path | None = None,
        tokens: bool = False,
    ) -> None:
        super().__init__(encoder, modality, root, tokens)
        self.chain, self.corrupt = list(chain), corrupt
        tag = ";".join(f"{c.kind}:{c.severity!r}" for c in chain)
        key = f"{encoder_key(encoder, tokens)}|corrupt={tag}|seed={seed}"
        self.dir = self.root / sha256_text(key)[:20]
        self._read_index()

    def _load_raw(self, raw: str) -> object:
        return self.corrupt(self.encoder, raw, self.chain)


class WithAbsent:
    """A loader's collate function plus {modality: (N,) bool} records that lack a modality (OR-ed into the
    batch's `absent`, gathered by the batch's record positions). Plain attributes only, so it pickles."""

    def __init__(self, base: Any, absent: Mapping[str, torch.Tensor]) -> None:
        self.base, self.absent = base, dict(absent)

    def __call__(self, items: Any) -> dict[str, Any]:
        batch = self.base(items)
        index = batch["index"].cpu()
        batch["absent"] = merge_absent(batch.get("absent"), {m: rows[index] for m, rows in self.absent.items()})
        return batch


def flat(table: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"<task>/<metric>": v}."""
    return {f"{task}/{metric}": float(v) for task, metrics in table.items() for metric, v in metrics.items()}


def sweep(
    run_dir: Path,
    split: str = "test",
    kinds: dict[str, list[str]] | None = None,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Evaluate a run under every (modality, kind, severity) of a grid.

    Args:
        run_dir: the finished run.
        split: the split to evaluate.
        kinds: {modality: [kind, ...]}; default every kind that applies to each modality of the run. Severity 1
            of `absent` is the dropped modality.
        severities: the grid, each in [0, 1]; severity 0 is the clean evaluation (the identity).
        seed: the seed of every corruption draw.
        limit: evaluate only the first `limit` records of the split.

    Returns:
        {"conditions": [{"modality", "kind", "severity", "metrics": {"<task>/<metric>": value}}, ...],
         "clean": {"<task>/<metric>": value}, "higher_is_better": {"<task>/<metric>": bool}}.

    Raises:
        StressError: an unknown modality or kind, a kind that does not apply, a severity out of range.
    """
    stress = Stress(run_dir, split, limit=limit, seed=seed)
    grid = kinds if kinds is not None else {m: stress.kinds(m) for m in stress.model.encoders}
    conditions = [
        stress.check(Condition(m, k, float(s), "sweep")) for m, ks in grid.items() for k in ks for s in severities
    ]
    clean = flat(stress.evaluate())
    out = []
    for c in conditions:
        metrics = clean if c.severity == 0 else flat(stress.evaluate([c]))
        out.append({"modality": c.modality, "kind": c.kind, "severity": c.severity, "metrics": dict(metrics)})
    return {"conditions": out, "clean": clean, "higher_is_better": stress.higher_is_better()}
