"""Tests of mmfuse.datasets.relations: determinism, answers re-derived from the scenes, split hygiene, balance,
the baselines on hand-made cases, idempotent generation and the summary command (`mmfuse data relations`).

The answers are re-derived here by a separate parser of the question texts and a separate geometry over the
scene descriptions (`scenes.jsonl`), never by calling the generator's own question code.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmfuse.cli import main
from mmfuse.data.records import DataError
from mmfuse.datasets.relations import (
    COLORS,
    HELD_OUT,
    SPLIT_FILES,
    TEMPLATES,
    generate_relations,
    load_split,
    majority_baseline,
    score_predictions,
    summarize,
    text_only_ceiling,
    text_prior_accuracy,
)

SMALL = {"n_train_images": 150, "n_val_images": 20, "n_test_images": 60}
YES_NO_TYPES = ("exist", "relation")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_relations(tmp_path_factory.mktemp("rel") / "small", seed=0, **SMALL)


def _records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {s: load_split(folder, s) for s in SPLIT_FILES}


def _scenes(folder: Path) -> dict[str, list[dict[str, Any]]]:
    rows = [json.loads(line) for line in (folder / "scenes.jsonl").read_text().splitlines()]
    return {r["image"]: r["objects"] for r in rows}


def _margin(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["params"]["margin"]


# --------------------------------------------------------------------------- an independent answerer


def _gap(a: dict, rel: str, b: dict) -> int:
    """Signed pixels by which object a is `rel` object b (positive: it is)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel]


def _the(objects: list[dict], color: str, shape: str) -> dict:
    found = [o for o in objects if o["color"] == color and o["shape"] == shape]
    assert len(found) == 1, f"'the {color} {shape}' must name exactly one object, found {len(found)}"
    return found[0]


_REL = "(left of|right of|above|below)"
_PATTERNS = [
    ("exist", re.compile(r"is there a (\w+) (\w+)\?")),
    ("relation", re.compile(rf"is the (\w+) (\w+) {_REL} the (\w+) (\w+)\?")),
    ("count", re.compile(r"how many (?:(\w+) )?(\w+?)s? are there\?")),
    ("query_color", re.compile(rf"what color is the object {_REL} the (\w+) (\w+)\?")),
    ("query_shape", re.compile(rf"what shape is the object {_REL} the (\w+) (\w+)\?")),
]


def _count(objects: list[dict], first: str | None, noun: str) -> int:
    color = first if first else (noun if noun in COLORS else None)
    shape = None if noun in ("object", *COLORS) else noun
    return sum((color is None or o["color"] == color) and (shape is None or o["shape"] == shape) for o in objects)


def derive(text: str, objects: list[dict], margin: int) -> tuple[str, str]:
    """(question type, answer) of `text` about `objects`, asserting that the question is unambiguous."""
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if kind == "exist":
            return kind, "yes" if any(o["color"] == g[0] and o["shape"] == g[1] for o in objects) else "no"
        if kind == "relation":
            a, b = _the(objects, g[0], g[1]), _the(objects, g[3], g[4])
            assert a is not b and abs(_gap(a, g[2], b)) >= margin, f"ambiguous: {text}"
            return kind, "yes" if _gap(a, g[2], b) > 0 else "no"
        if kind == "count":
            return kind, str(_count(objects, g[0], g[1]))
        ref = _the(objects, g[1], g[2])
        others = [o for o in objects if o is not ref]
        assert all(abs(_gap(o, g[0], ref)) >= margin for o in others), f"ambiguous: {text}"
        (target,) = [o for o in others if _gap(o, g[0], ref) > 0]
        return kind, target["color" if kind == "query_color" else "shape"]
    raise AssertionError(f"no template matches {text!r}")


# --------------------------------------------------------------------------------------------- tests


def test_every_answer_is_rederived_from_the_scene(small: Path) -> None:
    scenes, margin = _scenes(small), _margin(small)
    checked = Counter()
    for split, records in _records(small).items():
        for r in records:
            kind, answer = derive(r["text"], scenes[r["image"]], margin)
            assert (kind, answer) == (r["question_type"], r["answer"]), (split, r)
            assert r["n_objects"] == len(scenes[r["image"]])
            assert r["count"] == (int(answer) if kind == "count" else None)
            checked[kind] += 1
    assert set(checked) == set(TEMPLATES)
    assert min(checked.values()) >= 20


def test_rendered_pixels_match_the_scene(small: Path) -> None:
    for image, objects in list(_scenes(small).items())[:40]:
        pixels = Image.open(small / image).convert("RGB")
        assert pixels.size == (64, 64)
        for o in objects:
            rgb = pixels.getpixel((o["x"], o["y"]))
            nearest = min(COLORS, key=lambda c: sum((p - q) ** 2 for p, q in zip(rgb, COLORS[c])))
            assert nearest == o["color"], (image, o, rgb)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, small: Path) -> None:
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    again = generate_relations(tmp_path / "again", seed=0, **SMALL)
    other = generate_relations(tmp_path / "other", seed=1, **SMALL)
    assert digest(again) == digest(small)
    assert (other / "train.jsonl").read_bytes() != (small / "train.jsonl").read_bytes()


def test_splits_are_disjoint_and_held_out_pairs_only_in_test_combo(small: Path) -> None:
    records, scenes = _records(small), _scenes(small)
    images = {s: {r["image"] for r in rs} for s, rs in records.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"] and images["test_combo"] <= images["test"]
    by_split: dict[str, set] = defaultdict(set)
    for image, objects in scenes.items():
        pixels = (small / image).read_bytes()
        by_split[image.split("/")[1]].add((hashlib.sha256(pixels).hexdigest(),))
        by_split[image.split("/")[1] + "-scene"].add(json.dumps(sorted(map(json.dumps, objects))))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not by_split[a] & by_split[b] and not by_split[a + "-scene"] & by_split[b + "-scene"]
    assert {len(by_split[s]) for s in ("train", "val", "test")} == {150, 20, 60}
    named = [f"{c} {s}" for c, s in HELD_OUT]
    for split in ("train", "val", "test"):
        assert not any(n in r["text"] for r in records[split] for n in named), split
    assert records["test_combo"] and all(any(n in r["text"] for n in named) for r in records["test_combo"])
    held_out_seen = sum(any((o["color"], o["shape"]) in HELD_OUT for o in scenes[i]) for i in images["train"])
    assert held_out_seen > 0  # the pairs are in training images, only never named


def test_yes_no_balanced_per_text_and_per_template(small: Path) -> None:
    for split in ("train", "test"):
        records = load_split(small, split)
        per_text: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            if r["question_type"] in YES_NO_TYPES:
                per_text[r["text"]][r["answer"]] += 1
        assert all(abs(c["yes"] - c["no"]) <= 1 for c in per_text.values())
        for kind in YES_NO_TYPES:
            answers = Counter(r["answer"] for r in records if r["question_type"] == kind)
            assert abs(answers["yes"] - answers["no"]) <= 0.05 * sum(answers.values()) + 2, (split, kind, answers)
        counts = Counter(r["answer"] for r in records if r["question_type"] == "count")
        assert len(counts) >= 5 and max(counts.values()) < 0.4 * sum(counts.values())


def test_text_only_ceiling_on_a_hand_made_case() -> None:
    pairs = [("a", "yes"), ("a", "yes"), ("a", "no"), ("b", "1"), ("b", "2"), ("c", "x"), ("b", "2"), ("b", "1")]
    # a: best 2 of 3; b: best 2 of 4; c: 1 of 1 -> 5 of 8
    assert text_only_ceiling(pairs) == pytest.approx(5 / 8)
    assert text_only_ceiling([]) == 0.0
    assert majority_baseline([a for _, a in pairs]) == pytest.approx(2 / 8)


def test_text_prior_from_train_on_a_hand_made_case() -> None:
    def rec(text: str, answer: str, kind: str) -> dict[str, str]:
        return {"text": text, "answer": answer, "question_type": kind}

    train = [rec("t1", "yes", "e"), rec("t1", "yes", "e"), rec("t1", "no", "e"), rec("t2", "no", "e")]
    test = [rec("t1", "yes", "e"), rec("t1", "no", "e"), rec("t3", "yes", "e"), rec("t4", "2", "c")]
    # t1 -> yes (right, wrong); t3 unseen -> type e's train majority "yes" (right); t4: unseen type -> overall "yes"
    assert text_prior_accuracy(train, test) == pytest.approx(2 / 4)


def test_ceiling_is_well_below_what_the_image_allows(small: Path) -> None:
    summary = summarize(small)
    test = summary["test"]
    assert test["majority"] < 0.35 and test["text_only_ceiling"] < 0.6
    pairs = [(r["text"], r["answer"]) for r in load_split(small, "test")]
    assert test["text_only_ceiling"] == pytest.approx(text_only_ceiling(pairs))


def test_generation_is_reused_replaced_or_refused(tmp_path: Path) -> None:
    tiny = {"n_train_images": 3, "n_val_images": 2, "n_test_images": 4}
    start = time.perf_counter()
    out = generate_relations(tmp_path / "set", seed=3, **tiny)
    assert time.perf_counter() - start < 5
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert generate_relations(tmp_path / "set", seed=3, **tiny) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    generate_relations(tmp_path / "set", seed=4, **tiny)
    assert json.loads((out / "manifest.json").read_text())["params"]["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left behind
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a relations data set"):
        generate_relations(out, seed=5, **tiny)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="image_size"):
        generate_relations(tmp_path / "bad", n_train_images=0)


def test_command_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "relations", "--out", str(tmp_path / "cli"), "--train-images", "6", "--val-images", "2"]
    args += ["--test-images", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "text-only ceiling" in out and "majority" in out and "test_combo" in out
    ceiling = summarize(tmp_path / "cli")["test"]["text_only_ceiling"]
    assert f"{ceiling:.2%}" in out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    assert main(["data", "relations", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a relations data set" in err


def test_predictions_are_scored_per_question_type(small: Path, tmp_path: Path) -> None:
    records = load_split(small, "test")
    wrong = {i for i in range(0, len(records), 3)}  # every third prediction wrong
    lines = []
    for i, r in enumerate(records):
        label = "not an answer" if i in wrong else r["answer"]
        lines.append(json.dumps({"source": f"x:{i + 1}", "answer": {"label": label, "probabilities": {}}}))
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(lines) + "\n")
    score = score_predictions(small, "test", path)
    assert score["accuracy"] == pytest.approx(1 - len(wrong) / len(records))
    relation = [i for i, r in enumerate(records) if r["question_type"] == "relation"]
    expected = sum(i not in wrong for i in relation) / len(relation)
    assert score["by_type"]["relation"]["accuracy"] == pytest.approx(expected)
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=f"{len(records) - 1} predictions for the {len(records)} records"):
        score_predictions(small, "test", path)
    path.write_text("\n".join([*lines[:-1], '{"answer": 3}']) + "\n")
    with pytest.raises(DataError, match=f"preds.jsonl:{len(records)}: no answer prediction"):
        score_predictions(small, "test", path)
