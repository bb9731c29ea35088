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

This module is the command's front door; the work lives in its pieces:

- `compare_args`: the command's own arguments (`--vary`, `--seeds`, `--out`, `--fusions`);
- `compare_fusions`: which fusions, with which options, the config's encoders can feed;
- `compare_plan`: every member and its config (`plan_compare`), validated before anything trains;
- `compare_run`: training or reading back the members and writing the outputs (`run_compare`);
- `compare_measure`: parameter counts and forward latency (`torch.utils.benchmark`);
- `compare_stress`: the `--stress` sweeps and their summary;
- `compare_report`: compare.json's summary and compare.md.

The steps `mmfuse bench` shares (reuse-or-train a run, the scoring split, the primary metrics, mean and std over
seeds) live in `mmfuse.multirun`.
"""

from __future__ import annotations

from mmfuse.multirun import primary_metrics, scoring_split
from mmfuse.multirun import seed_stats as stats
from mmfuse.workbench.compare_args import (
    FORBIDDEN_VARY,
    MAX_SEEDS,
    check_out,
    parse_fusions,
    parse_seeds,
    parse_vary,
    split_values,
)
from mmfuse.workbench.compare_fusions import CARRIED_OPTIONS, fusion_component, resolve_fusions, why_not_feedable
from mmfuse.workbench.compare_measure import LATENCY_BATCHES, count_parameters, measure_member
from mmfuse.workbench.compare_plan import Member, Plan, plan_compare
from mmfuse.workbench.compare_report import render_markdown, summarise
from mmfuse.workbench.compare_run import Progress, load_resolved, run_compare, train_member
from mmfuse.workbench.compare_stress import stress_member, summarise_stress

__all__ = [
    "CARRIED_OPTIONS",
    "FORBIDDEN_VARY",
    "LATENCY_BATCHES",
    "MAX_SEEDS",
    "Member",
    "Plan",
    "Progress",
    "check_out",
    "count_parameters",
    "fusion_component",
    "load_resolved",
    "measure_member",
    "parse_fusions",
    "parse_seeds",
    "parse_vary",
    "plan_compare",
    "primary_metrics",
    "render_markdown",
    "resolve_fusions",
    "run_compare",
    "scoring_split",
    "split_values",
    "stats",
    "stress_member",
    "summarise",
    "summarise_stress",
    "train_member",
    "why_not_feedable",
]
