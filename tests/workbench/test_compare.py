"""`mmfuse compare` end to end on the tiny data set: 2 fusions x 2 seeds, 1 epoch, tiny random-weight encoders.

Expected values are computed here from the members' own `metrics.json` files, never taken from compare.json.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mmfuse.cli import main
from mmfuse.data.cache import FeatureCache
from mmfuse.train import run as train_run
from mmfuse.workbench.compare import Progress, plan_compare, run_compare
from tiny import run_config, write_dataset

pytestmark = pytest.mark.slow  # the module fixture trains four tiny runs (about 40 s on a shared 2-core machine)

FUSIONS = ["concat", "film"]
PRIMARY = {"color": "accuracy", "is_question": "auroc", "size": "mae", "tags": "macro_f1"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare-data")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(run_config(write_dataset(root, n=40), max_epochs=1)))
    return path


@pytest.fixture(scope="module")
def compared(config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the comparison once, counting the feature cache's encoding passes during each member."""
    out = tmp_path_factory.mktemp("compare-out")
    calls: list[int] = []
    done: list[Progress] = []
    encodes_at_member: list[int] = []
    original = FeatureCache._encode_and_store

    def counting(self: FeatureCache, items: list[tuple[str, str]], batch_size: int) -> None:
        calls.append(len(items))
        original(self, items, batch_size)

    def progress(p: Progress) -> None:
        done.append(p)
        encodes_at_member.append(len(calls) - sum(encodes_at_member))

    with pytest.MonkeyPatch.context() as mp:
        # a cache of its own: other modules' tiny runs (the same seeded encoders, the same images) fill the session's
        mp.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("compare-cache")))
        mp.setattr(FeatureCache, "_encode_and_store", counting)
        plan = plan_compare(config, [], FUSIONS, 2, [], out)
        result = run_compare(plan, progress=progress)
    return {"out": out, "plan": plan, "result": result, "progress": done, "encodes": encodes_at_member}


def _member_metrics(out: Path, name: str) -> dict[str, dict[str, float]]:
    return json.loads((out / "members" / name / "metrics.json").read_text())["metrics"]["test"]


def test_compare_writes_members_report_json_and_one_bar_chart_per_task(compared: dict[str, Any]) -> None:
    out = compared["out"]
    names = [f"{f}_seed{s}" for s in (0, 1) for f in FUSIONS]
    assert [m.name for m in compared["plan"].members] == names
    for name in names:
        run = out / "members" / name
        for f in ("config.yaml", "metrics.json", "model.safetensors", "report.md"):
            assert (run / f).exists(), (name, f)
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["fusion"]["name"] == name.split("_")[0]
    for task in PRIMARY:
        png = out / f"bar_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    text = (out / "compare.md").read_text()
    assert "| setting | color accuracy ↑ | is_question auroc ↑ | size mae ↓ | tags macro_f1 ↑ |" in text
    assert [ln.split(" | ")[0] for ln in text.splitlines() if ln.startswith("| concat") or ln.startswith("| film")] == [
        "| concat",
        "| film",
    ]
    assert "![color](bar_color.png)" in text and "from image: cached features, text: cached features" in text
    picks = compared["result"]["picks"]  # one pick per task, in the report with its reason
    assert set(picks) == set(PRIMARY) and all(p["pick"] in ("concat", "film") for p in picks.values())
    assert "## Which to pick" in text and all(f"- **{t}**: `{p['pick']}`" in text for t, p in picks.items())
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(compared["result"]))


def test_aggregates_are_mean_and_sample_std_of_the_members_own_metrics(compared: dict[str, Any]) -> None:
    out, result = compared["out"], compared["result"]
    assert result["tasks"] == {
        "color": {"metric": "accuracy", "higher_is_better": True},
        "is_question": {"metric": "auroc", "higher_is_better": True},
        "size": {"metric": "mae", "higher_is_better": False},
        "tags": {"metric": "macro_f1", "higher_is_better": True},
    }
    groups = {g["label"]: g for g in result["groups"]}
    assert list(groups) == FUSIONS
    for fusion in FUSIONS:
        per_seed = [_member_metrics(out, f"{fusion}_seed{s}") for s in (0, 1)]
        for task, metrics in per_seed[0].items():
            for metric in metrics:
                values = np.array([m[task][metric] for m in per_seed])
                got = groups[fusion]["metrics"][task][metric]
                assert got["mean"] == pytest.approx(values.mean(), abs=1e-12)
                assert got["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        shown = f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"  # the last metric of the last task (tags)
        row = next(ln for ln in (out / "compare.md").read_text().splitlines() if ln.startswith(f"| {fusion} "))
        assert shown in row


def test_parameters_latency_and_training_time_come_from_each_member(compared: dict[str, Any]) -> None:
    from mmfuse.runs import load_run

    out, result = compared["out"], compared["result"]
    for g in result["groups"]:
        model = load_run(out / "members" / g["members"][0])
        total = sum(p.numel() for p in model.parameters())
        heads = sum(p.numel() for p in [*model.fusion.parameters(), *model.heads.parameters()])
        # frozen encoders: only the fusion and the heads train
        assert g["params"] == {"trainable": heads, "total": total}
        for b in ("1", "64"):
            assert g["latency_ms"][b]["mean"] > 0 and len(g["latency_ms"][b]["per_seed"]) == 2
        fits = [
            json.loads((out / "members" / n / "metrics.json").read_text())["timings_s"]["fit"] for n in g["members"]
        ]
        assert g["train_s"]["mean"] == pytest.approx(np.mean(fits))
    assert result["latency_from"] == {"image": "cached features", "text": "cached features"}


def test_members_with_the_same_frozen_encoders_do_not_encode_again(compared: dict[str, Any]) -> None:
    # members in order concat/seed0, film/seed0, concat/seed1, film/seed1. The tiny encoders are random-init and
    # built after seeding, so seed 1 has other encoders (encoded once); film reuses concat's features each time.
    enc = compared["encodes"]
    assert enc[0] > 0 and enc[2] > 0
    assert enc[1] == 0 and enc[3] == 0


def test_progress_is_reported_once_per_member_with_the_headline_metric(compared: dict[str, Any]) -> None:
    out, progress = compared["out"], compared["progress"]
    assert [(p.index, p.total, p.member.name, p.status) for p in progress] == [
        (i, 4, m.name, "trained") for i, m in enumerate(compared["plan"].members, 1)
    ]
    for p in progress:
        assert p.metric == "color/accuracy"
        assert p.value == _member_metrics(out, p.member.name)["color"]["accuracy"]


def test_a_rerun_reuses_finished_members_and_resumes_an_interrupted_one(
    compared: dict[str, Any], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = compared["out"]
    names = [m.name for m in compared["plan"].members]
    before = {n: (out / "members" / n / "metrics.json").stat().st_mtime_ns for n in names}
    trained: list[tuple[str, bool]] = []
    real_train = train_run.train

    def spy(cfg: Any, run_dir: Path, resume: bool = False) -> dict[str, Any]:
        trained.append((Path(run_dir).name, resume))
        return real_train(cfg, run_dir, resume=resume)

    monkeypatch.setattr(train_run, "train", spy)
    (out / "members" / names[3] / "metrics.json").unlink()  # interrupted after its last checkpoint
    seen: list[Progress] = []
    run_compare(plan_compare(config, [], FUSIONS, 2, [], out), progress=seen.append)
    assert trained == [(names[3], True)]
    assert [p.status for p in seen] == ["reused", "reused", "reused", "resumed"]
    for n in names[:3]:
        assert (out / "members" / n / "metrics.json").stat().st_mtime_ns == before[n]
    assert (out / "members" / names[3] / "metrics.json").exists()


def test_a_folder_holding_another_config_is_refused(compared: dict[str, Any], config: Path) -> None:
    from mmfuse.config import ConfigError

    plan = plan_compare(config, ["train.lr=0.5"], FUSIONS, 1, [], compared["out"])
    with pytest.raises(ConfigError, match="holds a run of another config"):
        run_compare(plan)


def test_cli_prints_one_progress_line_per_member(
    compared: dict[str, Any], config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = compared["out"]
    rc = main(["compare", str(config), "--fusions", "concat,film", "--seeds", "2", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0
    lines = [ln for ln in printed if ln.startswith("[")]
    assert len(lines) == 4
    for i, (ln, m) in enumerate(zip(lines, compared["plan"].members), 1):
        value = _member_metrics(out, m.name)["color"]["accuracy"]
        assert re.fullmatch(
            rf"\[{i}/4\] {m.fusion} seed={m.seed}: color/accuracy {value:.4f} \(\d+ s, finished before\)", ln
        )
    assert printed[-2:] == [f"report: {out / 'compare.md'}", f"data: {out / 'compare.json'}"]


# ---------------------------------------------------------------------- --stress against a fake sweep
SEVERITIES = (0.0, 0.5, 1.0)


def _fake_stress(calls: list[dict[str, Any]]) -> types.ModuleType:
    """A stand-in for mmfuse.workbench.stress: values that depend on the member (fusion, seed) and the severity."""

    def value(run_dir: Path, severity: float) -> float:
        fusion, seed = run_dir.name.split("_seed")
        return 0.9 - severity * (0.2 if fusion == "concat" else 0.4) - 0.01 * int(seed)

    def sweep(run_dir: Path, split: str = "test", kinds: Any = None, severities: Any = SEVERITIES, seed: int = 0,
              limit: int | None = None) -> dict[str, Any]:  # fmt: skip
        calls.append({"run": Path(run_dir).name, "split": split, "seed": seed, "limit": limit})
        conds = [
            {"modality": "image", "kind": "noise", "severity": s, "metrics": {"color/accuracy": value(run_dir, s)}}
            for s in SEVERITIES
        ]
        conds.append({"modality": "text", "kind": "absent", "severity": 1.0, "metrics": {"color/accuracy": 0.5}})
        return {"conditions": conds, "clean": {"color/accuracy": value(run_dir, 0.0)}}

    def robustness(curves: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
        """The real one's shape: {method: {"<modality>/<kind>": {"<task>/<metric>": figures}}}."""

        def noise(sweep: dict[str, Any]) -> list[float]:
            return [c["metrics"]["color/accuracy"] for c in sweep["conditions"] if c["kind"] == "noise"]

        base = noise(curves[baseline])
        return {
            name: {
                "image/noise": {
                    "color/accuracy": {
                        "relative_robustness": float(np.trapezoid(noise(sweep), SEVERITIES)),
                        "effective_robustness": float(
                            sum(np.subtract(noise(sweep), noise(sweep)[0]) - np.subtract(base, base[0]))
                        ),
                        "relative_robustness_normalized": None,  # the real one's None for fewer than two methods
                    }
                }
            }
            for name, sweep in curves.items()
        }

    mod = types.ModuleType("mmfuse.workbench.stress")
    mod.sweep, mod.robustness = sweep, robustness  # type: ignore[attr-defined]
    return mod


def test_stress_sweeps_every_member_once_and_averages_the_curves_over_seeds(
    compared: dict[str, Any], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = compared["out"]
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "mmfuse.workbench.stress", _fake_stress(calls))
    plan = plan_compare(config, [], FUSIONS, 2, [], out)
    result = run_compare(plan, stress=True, stress_limit=7)
    assert sorted(c["run"] for c in calls) == sorted(m.name for m in plan.members)
    assert all(c["split"] == "test" and c["limit"] == 7 for c in calls)
    assert {c["run"]: c["seed"] for c in calls} == {m.name: m.seed for m in plan.members}
    for fusion, slope in (("concat", 0.2), ("film", 0.4)):
        g = result["stress"]["groups"][fusion]
        noise = [c for c in g["conditions"] if c["kind"] == "noise"]
        assert [c["severity"] for c in noise] == list(SEVERITIES)
        for c in noise:
            per_seed = [0.9 - c["severity"] * slope - 0.01 * s for s in (0, 1)]
            assert c["metrics"]["color/accuracy"]["mean"] == pytest.approx(np.mean(per_seed))
            assert c["metrics"]["color/accuracy"]["std"] == pytest.approx(np.std(per_seed, ddof=1))
        rel = [np.trapezoid([0.9 - x * slope - 0.01 * seed for x in SEVERITIES], SEVERITIES) for seed in (0, 1)]
        got = g["robustness"]["image/noise/color/accuracy/relative_robustness"]
        assert got["mean"] == pytest.approx(np.mean(rel)) and got["std"] == pytest.approx(np.std(rel, ddof=1))
        # effective robustness against concat: film drops 0.2 more per unit of severity
        eff = sum(-x * (slope - 0.2) for x in SEVERITIES)
        assert g["robustness"]["image/noise/color/accuracy/effective_robustness"]["mean"] == pytest.approx(eff)
        assert "image/noise/color/accuracy/relative_robustness_normalized" not in g["robustness"]
    assert result["stress"]["baseline"] == "concat"
    for png in ("stress_image_noise.png", "stress_text_absent.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    text = (out / "compare.md").read_text()
    assert "## Robustness" in text and "| imperfection / metric | concat | film |" in text
    assert "| image/noise/color/accuracy | " in text
    assert "![image/noise](stress_image_noise.png)" in text
    assert json.loads((out / "compare.json").read_text())["stress"] == json.loads(json.dumps(result["stress"]))
    calls.clear()
    run_compare(plan, stress=True, stress_limit=7)  # finished sweeps are read back
    assert calls == []
