"""Explain one prediction of a finished run: what each task predicts, how much each modality gave to it, and what
the fusion did on the way (attention weights, a relation network's heaviest pairs, gates, FiLM's gamma and beta).

Shapes: B batch (1 here), D_m modality m's feature size, T tokens, Q query tokens, H heads, L layers, C_t outputs.

Each task's explained output is its top logit (the argmax of its outputs; the single logit of a binary task, the
value of a regression). A modality's contribution to it is

- exact ("exact") when the fusion returns per-modality terms (`FusionOutput.contributions`: sum, concat) and the
  task's head is one linear layer: `logit = sum_m w . c_m + (w . bias + b)`, so modality m gave `w . c_m` and the
  rest is the baseline;
- otherwise captum's Integrated Gradients ("integrated_gradients", Sundararajan et al. 2017) over the modalities'
  feature tensors (pooled and tokens), from all-zero features (what the model sees for an absent modality) to
  the real ones: the contributions sum to `logit - logit(zero features)` up to the reported `delta`;
- or, asked for, captum's Feature Ablation ("feature_ablation"): `logit - logit(modality m's features zeroed)`
  (not additive: with interactions the contributions need not sum to anything).

Encoders run once; attributions re-run only the fusion and the heads, so a prediction is explained in about the
time of a few forward passes.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmfuse.builders import run_outline
from mmfuse.data.records import DataError, Record
from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.attention import masked_mean
from mmfuse.fusion.base import FusionOutput
from mmfuse.predict import Predictor
from mmfuse.tasks.heads import linear_head
from mmfuse.utils import move_to

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "integrated_gradients", "feature_ablation")
PAIRS_SHOWN = 8  # a relation fusion's heaviest pairs in the report and the picture


class NeedsCaptum(RuntimeError):
    """The attribution asked for needs captum, which is not installed."""


@dataclass
class Explanation:
    """One explained prediction.

    Attributes:
        report: the JSON-able numbers (predictions, contributions, attention, gates, FiLM statistics).
        images: {modality: the decoded input image (PIL), cropped to the square the model saw} for image inputs.
    """

    report: dict[str, Any]
    images: dict[str, Any]


class Explainer:
    """Explains predictions of a run, one record at a time.

    Args:
        run: a run directory, or a loaded `Predictor` (its model is shared, never changed).
        device: "cpu" (default) or another torch device, when `run` is a directory.
        method: one of `METHODS`; "auto": exact where the model is additive, else integrated gradients.
        steps: integration steps of Integrated Gradients.

    Example:
        >>> ex = Explainer("runs/easy_vqa")
        >>> explanation = ex.explain(ex.record({"image": "shape.png", "text": "what color is the shape?"}))
        >>> explanation.report["contributions"]["answer"]["modalities"]
        {"image": 3.1, "text": 1.2}
    """

    def __init__(self, run: str | Path | Predictor, device: str = "cpu", method: str = "auto", steps: int = 32):
        if method not in METHODS:
            raise ValueError(f"attribution method must be one of {', '.join(METHODS)}; got {method!r}")
        if steps < 1:
            raise ValueError(f"integration steps must be at least 1, got {steps}")
        self.predictor = run if isinstance(run, Predictor) else Predictor(run, device)
        self.model, self.method, self.steps = self.predictor.model, method, steps
        self.fusion_name = run_outline(self.predictor.config).fusion.name

    def record(self, fields: Mapping[str, Any], allow_missing: bool = False, source: str = "command line") -> Record:
        """One checked record from field values (DataError for an unknown field or a missing input)."""
        records = self.predictor.records_from_fields(fields, source)
        good, _ = self.predictor.check(records, allow_missing=allow_missing)
        return good[0]

    def explain(self, record: Record) -> Explanation:
        """Predictions, per-modality contributions and the fusion's internals for one checked record."""
        start = time.perf_counter()
        batch = next(self.predictor.batches([record], 1))
        device = self.predictor.device
        inputs = move_to(batch["inputs"], device)
        absent = {m: a.to(device) for m, a in batch.get("absent", {}).items()}
        with torch.no_grad():
            features = {m: f.detach() for m, f in self.model.encode(inputs, absent=absent or None).items()}
            fused = self._fuse(features)
            logits = {name: head(fused.fused) for name, head in self.model.heads.items()}  # each (1, C_t)
        report: dict[str, Any] = {
            "fusion": self.fusion_name,
            "inputs": self._inputs(record),
            "predictions": self._predictions(logits),
            "contributions": self._contributions(features, fused, logits),
        }
        spatial = {m for m, e in self.model.encoders.items() if e.modality == "image"}
        report.update(fusion_internals(self.model.fusion, fused, features, self._token_labels(inputs), spatial))
        report["seconds"] = round(time.perf_counter() - start, 4)
        return Explanation(report, self._images(record))

    # ------------------------------------------------------------------ pieces
    def _fuse(self, features: dict[str, EncoderOutput]) -> FusionOutput:
        """The fusion's output, with attention weights where the fusion can return them."""
        fusion = self.model.fusion
        if "return_weights" in inspect.signature(fusion.forward).parameters:
            return fusion(features, return_weights=True)
        return fusion(features)

    def _inputs(self, record: Record) -> dict[str, Any]:
        out = {}
        for m, ref in record.inputs.items():
            out[m] = {"kind": self.model.encoders[m].modality, "value": None if ref is None else str(ref)}
        return out

    def _predictions(self, logits: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = {}
        for name, task in self.model.tasks.items():
            out[name] = {"kind": task.kind, **task.describe(task.predict(logits[name]), 0)}
        return out

    def _contributions(
        self, features: dict[str, EncoderOutput], fused: FusionOutput, logits: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        targets = {name: int(logits[name][0].argmax()) for name in logits}
        heads = {name: linear_head(head) for name, head in self.model.heads.items()}
        exact_ok = bool(fused.contributions) and all(h is not None for h in heads.values())
        method = self.method
        if method == "auto":
            method = "exact" if exact_ok else "integrated_gradients"
        if method == "exact" and not exact_ok:
            why = "its fusion returns no per-modality terms" if not fused.contributions else "a head is not linear"
            raise DataError(
                f"attribution 'exact' needs an additive model (sum/concat fusion, linear heads); {why} "
                f"(fusion {self.fusion_name}): use integrated_gradients or feature_ablation"
            )
        out: dict[str, Any] = {}
        for name in self.model.tasks:
            c = targets[name]
            entry = {"output": output_name(self.model.tasks[name], c), "index": c, "logit": float(logits[name][0, c])}
            if method == "exact":
                entry.update(exact_terms(fused, heads[name], c))
            else:
                terms = captum_terms(self.model, features, name, c, method, self.steps)
                gap = ig_gap(terms, entry["logit"])
                if gap is not None and self.method == "auto":  # the integral is off: show what does hold
                    terms = captum_terms(self.model, features, name, c, "feature_ablation", self.steps)
                    terms["note"] = f"integrated gradients {gap}; feature ablation shown instead"
                elif gap is not None:
                    terms["note"] = f"integrated gradients {gap}; try --steps or --attribution feature_ablation"
                entry.update(terms)
            out[name] = entry
        return out

    def _token_labels(self, inputs: Mapping[str, Any]) -> dict[str, list[str]]:
        """{modality: its token strings} for encoders with a tokenizer (one record)."""
        out = {}
        for m, encoder in self.model.encoders.items():
            tokenizer, given = getattr(encoder, "tokenizer", None), inputs.get(m)
            if tokenizer is not None and isinstance(given, Mapping) and "input_ids" in given:
                out[m] = [str(t) for t in tokenizer.convert_ids_to_tokens(given["input_ids"][0].tolist())]
        return out

    def _images(self, record: Record) -> dict[str, Any]:
        """The decoded image inputs, centre-cropped to the square the image encoders see."""
        out = {}
        for m, ref in record.inputs.items():
            if ref is None or self.model.encoders[m].modality != "image":
                continue
            image = self.model.encoders[m].load(ref).convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            out[m] = image.crop((left, top, left + side, top + side))
        return out


# ---------------------------------------------------------------------------------------------- contributions
def exact_terms(fused: FusionOutput, head: nn.Linear, c: int) -> dict[str, Any]:
    """`logit_c = sum_m w_c . contribution_m + baseline`, with `baseline = w_c . bias + b_c`."""
    w = head.weight[c].detach()  # (D_out,)
    terms = {m: float(t[0].detach() @ w) for m, t in fused.contributions.items()}
    baseline = float(head.bias[c]) if head.bias is not None else 0.0
    if fused.bias is not None:
        baseline += float(fused.bias.detach() @ w)
    return {"method": "exact", "modalities": terms, "baseline": baseline, "delta": 0.0}


def _parts(features: dict[str, EncoderOutput]) -> list[tuple[str, str]]:
    """(modality, "pooled" | "tokens") of every feature tensor, in a fixed order."""
    return [(m, p) for m, f in features.items() for p in ("pooled", "tokens") if getattr(f, p) is not None]


IG_TOLERANCE = 0.05  # the largest completeness error accepted, as a share of |logit - baseline|


def ig_gap(terms: dict[str, Any], logit: float) -> str | None:
    """None when Integrated Gradients' terms add up to `logit - baseline` within `IG_TOLERANCE` (or were not
    computed by it); else what is off, in words. A fusion that normalises its inputs (LayerNorm: co_attention,
    cross_attention) is flat along most of the path from zero features, so the integral misses the jump near 0."""
    if terms.get("method") != "integrated_gradients" or terms.get("delta") is None:
        return None
    change = abs(logit - terms["baseline"])
    if terms["delta"] <= max(IG_TOLERANCE * change, 1e-3):
        return None
    return f"do not add up (completeness error {terms['delta']:.3g} against logit - baseline {change:.3g})"


def captum_terms(
    model: nn.Module, features: dict[str, EncoderOutput], task: str, c: int, method: str, steps: int
) -> dict[str, Any]:
    """Per-modality attribution of task `task`'s output `c` over the feature tensors, from zero features."""
    try:
        from captum.attr import FeatureAblation, IntegratedGradients
    except ImportError:
        raise NeedsCaptum(f"attribution {method!r} needs captum (pip install 'mmfuse[explain]')") from None
    forward = _head_of_features(model, features, task, c, _parts(features))
    parts = _used_parts(forward, features, _parts(features))  # captum needs every input it is given to be used
    if not parts:  # the output reads no feature: nothing to attribute
        with torch.no_grad():
            value = float(forward(*(getattr(features[m], p) for m, p in _parts(features)))[0])
        return {"method": method, "modalities": dict.fromkeys(features, 0.0), "baseline": value, "delta": 0.0}
    forward = _head_of_features(model, features, task, c, parts)
    inputs = tuple(getattr(features[m], p).detach().clone() for m, p in parts)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    names = list(features)
    with torch.enable_grad():
        if method == "integrated_gradients":
            ig = IntegratedGradients(forward)
            attrs, delta = ig.attribute(
                inputs, baselines=baselines, n_steps=steps, internal_batch_size=steps, return_convergence_delta=True
            )
            terms = {m: 0.0 for m in names}
            for (m, _), a in zip(parts, attrs):
                terms[m] += float(a.sum())
            delta_value = float(delta.abs().max())
        else:
            groups = tuple(torch.full_like(x, names.index(m), dtype=torch.long) for (m, _), x in zip(parts, inputs))
            attrs = FeatureAblation(forward).attribute(inputs, baselines=baselines, feature_mask=groups)
            # every element of a group carries the group's whole effect: read one element per modality
            terms = {m: 0.0 for m in names}
            for (m, _), a in zip(parts, attrs):
                terms[m] = float(a.flatten()[0])
            delta_value = None
        with torch.no_grad():
            baseline = float(forward(*baselines)[0])
    return {"method": method, "modalities": terms, "baseline": baseline, "delta": delta_value}


def _head_of_features(
    model: nn.Module, features: dict[str, EncoderOutput], task: str, c: int, parts: list[tuple[str, str]]
) -> Any:
    """`f(*xs) -> (N,)`: task output `c` with the feature tensors `parts` replaced by `xs` (each (N, ...)); the
    other tensors, masks and presence flags are the record's own, repeated N times."""

    def forward(*xs: torch.Tensor) -> torch.Tensor:
        n = xs[0].shape[0]
        given = dict(zip(parts, xs))
        feats = {}
        for m, f in features.items():
            sized = {p: getattr(f, p) for p in ("pooled", "tokens") if getattr(f, p) is not None}
            sized = {p: given.get((m, p), t.expand(n, *t.shape[1:])) for p, t in sized.items()}
            feats[m] = EncoderOutput(
                pooled=sized["pooled"],
                tokens=sized.get("tokens"),
                mask=None if f.mask is None else f.mask.expand(n, -1),
                present=None if f.present is None else f.present.expand(n),
            )
        return model.heads[task](model.fusion(feats).fused)[:, c]

    return forward


def _used_parts(
    forward: Any, features: dict[str, EncoderOutput], parts: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The feature tensors that `forward`'s output depends on (one backward pass with `allow_unused`)."""
    xs = tuple(getattr(features[m], p).detach().clone().requires_grad_(True) for m, p in parts)
    with torch.enable_grad():
        grads = torch.autograd.grad(forward(*xs).sum(), xs, allow_unused=True)
    return [part for part, g in zip(parts, grads) if g is not None]


def output_name(task: Any, c: int) -> str:
    """What output `c` of a task's head means: a class, a binary task's positive class, or "value"."""
    classes = task.classes or []
    if task.out_dim == 1 and len(classes) == 2:
        return f"{classes[1]} (vs {classes[0]})"
    if c < len(classes):
        return str(classes[c])
    return "value" if task.out_dim == 1 else f"output {c}"


# ---------------------------------------------------------------------------------------------- fusion internals
def fusion_internals(
    fusion: nn.Module,
    fused: FusionOutput,
    features: dict[str, EncoderOutput],
    token_labels: dict[str, list[str]],
    spatial: set[str],
) -> dict[str, Any]:
    """{"attention": [...]} / {"pairs": ...} / {"gate": ...} / {"film": ...}: what the fusion returned besides `fused`.

    `spatial` names the modalities whose tokens are a flattened image grid (image encoders' feature maps).
    """
    out: dict[str, Any] = {}
    maps = attention_maps(fusion, fused.extras, features, token_labels, spatial)
    if maps:
        out["attention"] = maps
    if "pair_weights" in fused.extras:
        out["pairs"] = top_pairs(fusion, fused.extras["pair_weights"][0])
    if "gate" in fused.extras:
        out["gate"] = {
            "gate_on": getattr(fusion, "gate_on", None),
            "gated": getattr(fusion, "gated", None),
            **value_stats(fused.extras["gate"][0]),
            "open_fraction": float((fused.extras["gate"][0] > 0.5).float().mean()),
        }
    if "gamma" in fused.extras and "beta" in fused.extras:
        out["film"] = {
            "condition_on": getattr(fusion, "condition_on", None),
            "target": getattr(fusion, "target", None),
            "gamma": value_stats(fused.extras["gamma"][0]),
            "beta": value_stats(fused.extras["beta"][0]),
        }
    return out


def top_pairs(fusion: nn.Module, weights: torch.Tensor, top: int = PAIRS_SHOWN) -> dict[str, Any]:
    """The `top` heaviest pairs of a relation fusion's (T, T) pair weights (`relation`'s `extras["pair_weights"]`).

    Each pair names its two cells (row, column) on the grid, its weight and its share of all the weight: an attention
    weight (the shares sum to 1), or the norm of g on the pair (its contribution to g's sum over pairs).
    """
    w = weights.detach().float().cpu()
    n = w.shape[0]
    grid = _grid(fusion, n) or (1, n)
    total = float(w.sum()) or 1.0
    values, index = w.flatten().topk(min(top, int((w > 0).sum())))
    pairs = []
    for value, k in zip(values.tolist(), index.tolist()):
        i, j = divmod(k, n)
        cells = [list(divmod(i, grid[1])), list(divmod(j, grid[1]))]
        pairs.append({"i": i, "j": j, "cells": cells, "weight": value, "share": value / total})
    return {
        "modality": getattr(fusion, "spatial", None),
        "weight": "attention" if getattr(fusion, "aggregate", None) == "attention" else "norm of g",
        "grid": list(grid),
        "real_pairs": int((w > 0).sum()),
        "top": pairs,
    }


def value_stats(values: torch.Tensor, bins: int = 20) -> dict[str, Any]:
    """Mean, std, min, max, a histogram and the values themselves of a (H,) vector (one per unit)."""
    v = values.detach().float().cpu()
    counts, edges = torch.histogram(v, bins=bins)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "max": float(v.max()),
        "histogram": {"counts": [int(x) for x in counts.tolist()], "edges": edges.tolist()},
        "values": v.tolist(),
    }


def _attention_sources(fusion: nn.Module, extras: Mapping[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """(query modality, key modality, weights) for every attention map in `extras`."""
    found = []
    if "attention" in extras and hasattr(fusion, "q_side") and hasattr(fusion, "k_side"):
        found.append((fusion.q_side, fusion.k_side, extras["attention"]))
    modalities = list(getattr(fusion, "modalities", []))
    for a in modalities:
        for b in modalities:
            key = f"attention_{a}_to_{b}"
            if a != b and key in extras:
                found.append((a, b, extras[key]))
    return found


def attention_maps(
    fusion: nn.Module,
    extras: Mapping[str, torch.Tensor],
    features: dict[str, EncoderOutput],
    token_labels: dict[str, list[str]],
    spatial: set[str],
) -> list[dict[str, Any]]:
    """Per attention map: the weights over the key tokens, averaged over layers, heads and the real queries.

    Each row of attention is a distribution over the key tokens, so the average is one too (it sums to 1 when the
    sample has a real key token).
    """
    maps = []
    for q, k, weights in _attention_sources(fusion, extras):
        w = weights[0].float()  # (..., Q, T): (H, Q, T) or (L, H, Q, T)
        w = w.reshape(-1, *w.shape[-2:]).mean(dim=0)  # (Q, T)
        q_mask = _real_mask(features[q], w.shape[0])  # (Q,)
        avg = masked_mean(w.unsqueeze(0), q_mask.unsqueeze(0))[0]  # (T,): over the real queries
        entry: dict[str, Any] = {
            "query": q,
            "key": k,
            "weights": avg.tolist(),
            "averaged_over": {"maps": weights[0].numel() // w.numel(), "queries": int(q_mask.sum())},
            "grid": None,
            "tokens": None,
        }
        grid = _grid(fusion, w.shape[1]) if k in spatial and features[k].mask is None else None
        if grid is not None:
            entry["grid"] = list(grid)
        else:
            labels = token_labels.get(k) or [str(i) for i in range(w.shape[1])]
            entry["tokens"] = labels[: w.shape[1]]
            entry["real"] = _real_mask(features[k], w.shape[1]).bool().tolist()
        maps.append(entry)
    return maps


def _real_mask(side: EncoderOutput, n: int) -> torch.Tensor:
    """(n,) float mask of the real tokens of one sample (all ones for a pooled query, n == 1)."""
    if side.tokens is None or side.tokens.shape[1] != n:
        return torch.ones(n)
    mask = torch.ones(n, dtype=torch.bool) if side.mask is None else side.mask[0].bool().cpu()
    if side.present is not None:
        mask = mask & bool(side.present[0])
    return mask.float()


def _grid(fusion: nn.Module, n: int) -> tuple[int, int] | None:
    """(h, w) of n spatial tokens: the fusion's `grid` option when it has one, else the square grid (None if none)."""
    from mmfuse.fusion.positional import grid_shape

    try:
        return grid_shape(n, getattr(fusion, "grid", None), "image")
    except ValueError:
        return None


def write(explanation: Explanation, out: str | Path) -> tuple[Path, Path]:
    """Write the picture to `out` (PNG) and the numbers beside it (same name, .json); returns both paths."""
    import json

    from mmfuse.workbench.explain_figure import render

    out = Path(out)
    json_path = out.with_suffix(".json")
    out.write_bytes(render(explanation))
    json_path.write_text(json.dumps(explanation.report, indent=2, allow_nan=False) + "\n")
    return out, json_path


def check_out_path(out: str | Path) -> None:
    """DataError when `out` cannot be written: not a .png name, or its folder does not exist."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise DataError(f"--out {out}: the picture is a PNG; give a name ending in .png (the JSON goes beside it)")
    if not path.parent.is_dir():
        raise DataError(f"--out {out}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise DataError(f"--out {out}: is a folder; give a file name ending in .png")


def explain_fields(
    run: str | Path | Predictor,
    fields: Mapping[str, Any],
    method: str = "auto",
    steps: int = 32,
    allow_missing: bool = False,
) -> Explanation:
    """Explain one record given as {field: value} (convenience for the CLI)."""
    explainer = Explainer(run, method=method, steps=steps)
    return explainer.explain(explainer.record(fields, allow_missing))


def top_classes(prediction: Mapping[str, Any], top: int) -> Sequence[tuple[str, float]]:
    """The `top` most probable (class, probability) pairs of a described prediction ([] without probabilities)."""
    probs = prediction.get("probabilities") or {}
    return sorted(probs.items(), key=lambda kv: -kv[1])[:top]
