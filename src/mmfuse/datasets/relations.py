"""Relations: a built-in VQA set about several objects: spatial relations, counting and attribute binding.

easy-VQA shows one shape per image, so pooled features and any fusion saturate it. Here every image holds 3-6
objects (4 colours x 3 shapes, the same kind may repeat) and the questions need to relate them:

    exist        "is there a red circle?"                          yes/no   (binding: red AND circle on one object)
    relation     "is the red circle left of the blue square?"      yes/no   (left of, right of, above, below)
    count        "how many green objects are there?"                0-6     (also circles, green circles, objects)
    query_color  "what color is the object below the red circle?"   colour   (exactly one object satisfies it)
    query_shape  "what shape is the object left of the blue square?" shape

Everything is generated offline from a seed (scenes, PIL rendering at 4x then downsampled, questions) and the answer of
every question is computed from the scene, so it is right by construction; `scenes.jsonl` keeps each scene's object
list so answers can be re-derived independently (the tests do). An object named by colour and shape is only referred
to when it is the only one of its kind in the image, and a relation is only asked when no object involved lies within
`margin` pixels of the other along the relation's axis, so no question is ambiguous.

Balance: questions are chosen per image (8 by default: 1 exist, 3 relation, 2 count, 1 of each query, a template
short of candidates filled with relations, then any; at most one relation question per pair of objects), greedily,
to even out the answers of each distinct question text (the candidate whose answer is most under-represented for its
text wins; a yes/no text's yes and no counts never differ by more than one), so the text alone tells little: the
text-only ceiling (the best accuracy of any function of the question alone, measured on the test split itself) stays
far below the 100% that image + question allow. `summarize` measures it exactly, with the majority baseline and the
text-only prior learned from train.

Splits: train, val and test come from distinct scenes (separate seeded streams; a scene is never repeated). The
colour-shape pairs in `HELD_OUT` ("red triangle", "blue circle" by default) appear in images of every split but are
never named in a train, val or test question; `test_combo.jsonl` asks exist, relation and query questions about them
on the test images (systematic generalisation; texts never seen in training, so the text-only prior from train falls
back to the template's majority there).

Files written under `out_dir`: `images/{train,val,test}/NNNNNN.png`, `train.jsonl`, `val.jsonl`, `test.jsonl`,
`test_combo.jsonl` (records: image, text, answer, question_type, count (count questions only, else null),
n_objects, image_id), `scenes.jsonl`, `manifest.json` (seed and parameters: a folder with the same manifest is
reused as is) and a `.gitignore` that keeps the generated folder out of git.

Generate and train (see docs/relations.md):

    mmfuse data relations --out data/relations          # prints counts, baselines and the ceiling
    mmfuse train configs/relations.yaml --out runs/relations

From Python: `generate_relations("data/relations", seed=0)`, then `format_summary(summarize(folder))`. Accuracy per
question type of a run: `mmfuse predict RUN --input data/relations/test.jsonl --output p.jsonl`, then
`mmfuse data relations --out data/relations --score p.jsonl [--split test_combo]`.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmfuse.data.records import DataError
from mmfuse.datasets.folders import build_into

VERSION = 1
GENERATOR = "mmfuse.data.relations"  # the manifest's id, from the generator's first home: older sets stay reusable
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (230, 195, 25),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
TEMPLATES = ("exist", "relation", "count", "query_color", "query_shape")
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"))
QUOTA: dict[str, int] = {"exist": 1, "relation": 3, "count": 2, "query_color": 1, "query_shape": 1}
YES_NO = ("yes", "no")
SPLIT_FILES = ("train", "val", "test", "test_combo")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    """One object of a scene: colour and shape names, centre (x, y) and box side in pixels (y grows downwards)."""

    color: str
    shape: str
    x: int
    y: int
    size: int


@dataclass(frozen=True)
class Question:
    """A question about one scene with its answer; `mentions` are the colour-shape pairs its text names."""

    template: str
    text: str
    answer: str
    mentions: tuple[tuple[str, str], ...] = ()
    count: int | None = None


# ----------------------------------------------------------------------------------------------- scenes and pixels


def sample_scene(rng: random.Random, image_size: int = 64, n_min: int = 3, n_max: int = 6) -> list[Obj]:
    """3-6 objects of random colour, shape and size (16-22% of the image side), boxes apart by >= 2 px."""
    n = rng.randint(n_min, n_max)
    while True:
        objects: list[Obj] = []
        for _ in range(200 * n):
            size = rng.randint(round(0.16 * image_size), round(0.22 * image_size))
            half = size // 2 + 1
            x, y = rng.randint(half, image_size - 1 - half), rng.randint(half, image_size - 1 - half)
            if all(max(abs(x - o.x), abs(y - o.y)) >= (size + o.size) / 2 + 2 for o in objects):
                objects.append(Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), x, y, size))
                if len(objects) == n:
                    return objects


def render_scene(objects: Sequence[Obj], image_size: int, rng: random.Random) -> Image.Image:
    """The scene drawn at 4x on a light grey background (colours jittered by +-15), downsampled to `image_size`."""
    k = _SUPERSAMPLE
    grey = rng.randint(230, 250)
    image = Image.new("RGB", (image_size * k, image_size * k), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for o in objects:
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[o.color])
        cx, cy, h = o.x * k, o.y * k, o.size * k / 2
        if o.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - 0.85 * h, cy - 0.85 * h, cx + 0.85 * h, cy + 0.85 * h), fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + 0.8 * h), (cx + h, cy + 0.8 * h)], fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------- questions and answers


def holds(a: Obj, relation: str, b: Obj, margin: int) -> bool | None:
    """Whether `a` is `relation` `b` (by centres; y grows downwards); None when within `margin` px (ambiguous)."""
    axis_gap = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]
    if abs(axis_gap) < margin:
        return None
    return axis_gap > 0


def _unique(objects: Sequence[Obj]) -> list[Obj]:
    kinds = Counter((o.color, o.shape) for o in objects)
    return [o for o in objects if kinds[(o.color, o.shape)] == 1]


def _exist_questions(objects: Sequence[Obj]) -> list[Question]:
    present = {(o.color, o.shape) for o in objects}
    return [
        Question("exist", f"is there a {c} {s}?", "yes" if (c, s) in present else "no", ((c, s),))
        for c in COLORS
        for s in SHAPES
    ]


def _relation_questions(objects: Sequence[Obj], margin: int) -> list[Question]:
    out = []
    for a in _unique(objects):
        for b in _unique(objects):
            for rel in RELATIONS:
                verdict = None if a is b else holds(a, rel, b, margin)
                if verdict is not None:
                    text = f"is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?"
                    pairs = ((a.color, a.shape), (b.color, b.shape))
                    out.append(Question("relation", text, "yes" if verdict else "no", pairs))
    return out


def _count_questions(objects: Sequence[Obj]) -> list[Question]:
    def q(text: str, n: int, pairs: tuple[tuple[str, str], ...] = ()) -> Question:
        return Question("count", text, str(n), pairs, n)

    out = [q("how many objects are there?", len(objects))]
    out += [q(f"how many {c} objects are there?", sum(o.color == c for o in objects)) for c in COLORS]
    out += [q(f"how many {s}s are there?", sum(o.shape == s for o in objects)) for s in SHAPES]
    for c in COLORS:
        for s in SHAPES:
            n = sum(o.color == c and o.shape == s for o in objects)
            out.append(q(f"how many {c} {s}s are there?", n, ((c, s),)))
    return out


def _query_questions(objects: Sequence[Obj], margin: int) -> list[Question]:
    out = []
    for ref in _unique(objects):
        for rel in RELATIONS:
            verdicts = [holds(o, rel, ref, margin) for o in objects if o is not ref]
            if None in verdicts or sum(bool(v) for v in verdicts) != 1:
                continue
            (target,) = [o for o in objects if o is not ref and holds(o, rel, ref, margin)]
            where = f"{rel} the {ref.color} {ref.shape}?"
            pair = ((ref.color, ref.shape),)
            out.append(Question("query_color", f"what color is the object {where}", target.color, pair))
            out.append(Question("query_shape", f"what shape is the object {where}", target.shape, pair))
    return out


def scene_questions(objects: Sequence[Obj], margin: int) -> list[Question]:
    """Every unambiguous question of every template about the scene, with its answer."""
    return [
        *_exist_questions(objects),
        *_relation_questions(objects, margin),
        *_count_questions(objects),
        *_query_questions(objects, margin),
    ]


def _topic(q: Question) -> str | frozenset[tuple[str, str]]:
    """What one image is asked about at most once: the text, or for relations the unordered pair of objects."""
    return frozenset(q.mentions) if q.template == "relation" else q.text


class AnswerBalancer:
    """Chooses questions so that each distinct text's answers stay as even as the scenes allow.

    Greedy: among the candidates, take the one whose answer is the most behind its text's most frequent answer
    (`count[text][answer] - max_a count[text][a]`, most negative first), then the least asked answer, then at random.
    A yes/no question whose answer is already ahead for its text is never taken, so each yes/no text's answers
    differ by at most one.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)

    def _key(self, q: Question) -> tuple[int, int, float]:
        seen = self.counts[q.text]
        top = max(seen.values(), default=0)
        return seen[q.answer] - top, seen[q.answer], self.rng.random()

    def _ahead(self, q: Question) -> bool:
        seen = self.counts[q.text]
        return q.answer in YES_NO and seen[q.answer] > seen[YES_NO[q.answer == "yes"]]

    def choose(self, candidates: Sequence[Question], quota: Mapping[str, int], total: int) -> list[Question]:
        """Up to `total` questions on distinct topics: `quota[template]` of each first, then relations, then any."""
        by_template: dict[str, list[Question]] = defaultdict(list)
        for q in candidates:
            by_template[q.template].append(q)
        chosen: list[Question] = []
        for template, n in quota.items():
            chosen += self.take(by_template[template], n, chosen)
        for pool in (by_template["relation"], candidates):  # a short template is filled with relations first
            chosen += self.take(pool, total - len(chosen), chosen)
        return chosen

    def take(self, pool: Sequence[Question], n: int, chosen: Sequence[Question] = ()) -> list[Question]:
        """Up to `n` questions of `pool` on topics not in `chosen` (`_topic`), best balancing first; counts them."""
        taken: list[Question] = []
        texts = {_topic(q) for q in chosen}
        for q in sorted(pool, key=self._key):  # keys are fixed for this call: counts update after the batch
            if len(taken) == n:
                break
            if _topic(q) not in texts and not self._ahead(q):
                taken.append(q)
                texts.add(_topic(q))
        for q in taken:
            self.counts[q.text][q.answer] += 1
        return taken


# ------------------------------------------------------------------------------------------------------ generation


def _params(seed: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        **kwargs,
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "held_out": [list(p) for p in HELD_OUT],
        "quota": dict(QUOTA),
    }


def _mentions_held_out(q: Question) -> bool:
    return any(p in HELD_OUT for p in q.mentions)


def _record(q: Question, image: str, image_id: str, n_objects: int) -> dict[str, Any]:
    return {
        "image": image,
        "text": q.text,
        "answer": q.answer,
        "question_type": q.template,
        "count": q.count,
        "n_objects": n_objects,
        "image_id": image_id,
    }


def _signature(objects: Iterable[Obj]) -> tuple[Obj, ...]:
    return tuple(sorted(objects, key=lambda o: (o.color, o.shape, o.x, o.y, o.size)))


def _generate_split(
    folder: Path, split: str, n_images: int, params: Mapping[str, Any], seen: set[tuple[Obj, ...]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(records, held-out combination records, scenes) of one split; images written under folder/images/split."""
    rng = random.Random(f"relations:{params['seed']}:{split}")
    size, margin = params["image_size"], params["margin"]
    total = params["questions_per_image"]
    quota = {t: n * total // sum(QUOTA.values()) for t, n in QUOTA.items()}
    usual, combo = AnswerBalancer(rng), AnswerBalancer(rng)
    (folder / "images" / split).mkdir(parents=True)
    records, combo_records, scenes = [], [], []
    for i in range(n_images):
        objects = sample_scene(rng, size)
        while _signature(objects) in seen:  # never the same scene twice, across splits
            objects = sample_scene(rng, size)
        seen.add(_signature(objects))
        image, image_id = f"images/{split}/{i:06d}.png", f"{split}/{i:06d}"
        render_scene(objects, size, rng).save(folder / image)
        candidates = scene_questions(objects, margin)
        usual_pool = [q for q in candidates if not _mentions_held_out(q)]
        records += [_record(q, image, image_id, len(objects)) for q in usual.choose(usual_pool, quota, total)]
        if split == "test":
            combo_pool = [q for q in candidates if _mentions_held_out(q) and q.template != "count"]
            picked = combo.choose(
                combo_pool, {"relation": (params["combo_per_image"] + 1) // 2}, params["combo_per_image"]
            )
            combo_records += [_record(q, image, image_id, len(objects)) for q in picked]
        scenes.append({"image_id": image_id, "image": image, "objects": [asdict(o) for o in objects]})
    return records, combo_records, scenes


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _generate_into(folder: Path, params: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    seen: set[tuple[Obj, ...]] = set()
    all_scenes, counts = [], {}
    for split in ("train", "val", "test"):
        records, combo, scenes = _generate_split(folder, split, params[f"n_{split}_images"], params, seen)
        _write_jsonl(folder / f"{split}.jsonl", records)
        counts[split] = {"images": len(scenes), "questions": len(records)}
        if split == "test":
            _write_jsonl(folder / "test_combo.jsonl", combo)
            counts["test_combo"] = {"images": len({r["image"] for r in combo}), "questions": len(combo)}
        all_scenes += scenes
    _write_jsonl(folder / "scenes.jsonl", all_scenes)
    (folder / ".gitignore").write_text("# generated by mmfuse data relations\n*\n")
    return counts


_OWN_NAMES = {"images", "manifest.json", "scenes.jsonl", ".gitignore", *(f"{s}.jsonl" for s in SPLIT_FILES)}


def _reusable(out: Path, params: Mapping[str, Any]) -> bool:
    """True when `out` holds this very generation; False when it is absent, empty or another relations generation.

    Raises:
        DataError: when `out` holds anything that this generator did not write.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    names = {p.name for p in out.iterdir()}
    if not names:
        return False
    try:
        old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["params"]
        ours = old["generator"] == params["generator"]
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours or names - _OWN_NAMES:
        raise DataError(f"{out}: not empty and not a relations data set; choose an empty or new folder")
    return old == params and all((out / f"{s}.jsonl").is_file() for s in SPLIT_FILES)


def generate_relations(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train_images: int = 4000,
    n_test_images: int = 1000,
    n_val_images: int = 500,
    questions_per_image: int = 8,
    combo_per_image: int = 2,
    image_size: int = 64,
) -> Path:
    """Generate the relations set into `out_dir` (once: a folder holding the same generation is reused).

    The folder is built next to `out_dir` and moved into place when complete, so an interrupted run leaves no
    half-written set. A previous generation with other parameters is replaced; a folder holding anything else
    is refused.

    Args:
        out_dir: destination folder.
        seed: seed of every scene, rendering and question choice.
        n_train_images, n_test_images, n_val_images: distinct scenes per split.
        questions_per_image: questions per image in train, val and test.
        combo_per_image: questions per test image about a held-out colour-shape pair (`test_combo.jsonl`).
        image_size: side of the square images in pixels.

    Returns:
        The folder (train.jsonl, val.jsonl, test.jsonl, test_combo.jsonl, scenes.jsonl, images/, manifest.json).

    Raises:
        DataError: a bad parameter, or an `out_dir` that holds other files.
    """
    sizes = {"n_train_images": n_train_images, "n_val_images": n_val_images, "n_test_images": n_test_images}
    if min(sizes.values()) < 1 or questions_per_image < 1 or combo_per_image < 0 or image_size < 32:
        raise DataError("relations: need >= 1 image per split, >= 1 question per image and image_size >= 32")
    margin = max(3, image_size // 12)
    params = _params(
        seed,
        **sizes,
        questions_per_image=questions_per_image,
        combo_per_image=combo_per_image,
        image_size=image_size,
        margin=margin,
    )
    out = Path(out_dir)
    if not _reusable(out, params):  # else: an empty folder or another relations generation, replaced
        build_into(out, lambda folder: _write_set(folder, params))
    return out


def _write_set(folder: Path, params: Mapping[str, Any]) -> None:
    counts = _generate_into(folder, params)
    (folder / "manifest.json").write_text(json.dumps({"params": params, "counts": counts}, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ baselines and summary


def load_split(out_dir: str | os.PathLike[str], split: str) -> list[dict[str, Any]]:
    """The records of one split file (train, val, test or test_combo) as dicts."""
    path = Path(out_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; generate the set first (mmfuse data relations --out DIR)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def majority_baseline(answers: Iterable[str]) -> float:
    """Accuracy of always giving the most frequent answer of these answers (the best constant answer)."""
    counts = Counter(answers)
    return max(counts.values()) / sum(counts.values()) if counts else 0.0


def text_only_ceiling(pairs: Iterable[tuple[str, str]]) -> float:
    """Best accuracy of any function of the question alone on these (text, answer) pairs.

    The best such function answers each distinct text with its most frequent answer, so the ceiling is
    `sum over distinct texts of max_a count(text, a) / number of pairs`: exact, measured on the data itself.
    """
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    for text, answer in pairs:
        by_text[text][answer] += 1
    total = sum(sum(c.values()) for c in by_text.values())
    return sum(max(c.values()) for c in by_text.values()) / total if total else 0.0


def text_prior_accuracy(train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]]) -> float:
    """Accuracy on `test` of answering each text with its most frequent answer in `train` (for a text never seen
    in train: its question type's most frequent train answer): a text-only model that is learnable from train."""
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    for r in train:
        by_text[r["text"]][r["answer"]] += 1
        by_type[r["question_type"]][r["answer"]] += 1
    overall = Counter(r["answer"] for r in train)

    def guess(r: Mapping[str, Any]) -> str:
        counts = by_text.get(r["text"]) or by_type.get(r["question_type"]) or overall
        return counts.most_common(1)[0][0]

    return sum(guess(r) == r["answer"] for r in test) / len(test) if test else 0.0


def _split_summary(records: Sequence[Mapping[str, Any]], train: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    pairs = [(r["text"], r["answer"]) for r in records]
    types: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        types[r["question_type"]].append(r)
    return {
        "images": len({r["image"] for r in records}),
        "questions": len(records),
        "distinct_texts": len({r["text"] for r in records}),
        "answers": dict(Counter(r["answer"] for r in records).most_common()),
        "majority": majority_baseline(r["answer"] for r in records),
        "text_only_ceiling": text_only_ceiling(pairs),
        "text_prior_from_train": text_prior_accuracy(train, records),
        "by_type": {
            t: {
                "questions": len(rs),
                "majority": majority_baseline(r["answer"] for r in rs),
                "text_only_ceiling": text_only_ceiling((r["text"], r["answer"]) for r in rs),
            }
            for t, rs in sorted(types.items())
        },
    }


def summarize(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Per split: images, questions, distinct texts, answer counts, majority baseline, text-only ceiling, the
    text-only prior learned from train, and the same per question type."""
    splits = {s: load_split(out_dir, s) for s in SPLIT_FILES}
    return {s: _split_summary(rs, splits["train"]) for s, rs in splits.items()}


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a few plain-text tables."""
    lines = ["split       images  questions  texts  majority  text-only ceiling  text prior (train)"]
    for s, d in summary.items():
        lines.append(
            f"{s:<11} {d['images']:>6}  {d['questions']:>9}  {d['distinct_texts']:>5}  {d['majority']:>8.2%}"
            f"  {d['text_only_ceiling']:>17.2%}  {d['text_prior_from_train']:>18.2%}"
        )
    for s in ("test", "test_combo"):
        lines += ["", f"{s} by question type: questions, majority, text-only ceiling"]
        for t, d in summary[s]["by_type"].items():
            lines.append(f"  {t:<12} {d['questions']:>6}  {d['majority']:>7.2%}  {d['text_only_ceiling']:>7.2%}")
    lines += ["", "answers (test): " + ", ".join(f"{a} {n}" for a, n in summary["test"]["answers"].items())]
    return "\n".join(lines)


def _predicted_answer(line: str, where: str) -> str:
    try:
        value = json.loads(line).get("answer")
    except (ValueError, AttributeError):
        raise DataError(f"{where}: not a JSON object") from None
    value = value.get("label") if isinstance(value, dict) else value
    if not isinstance(value, str):
        raise DataError(
            f'{where}: no answer prediction (expected {{"answer": {{"label": ...}}}} or {{"answer": "..."}})'
        )
    return value


def score_predictions(
    out_dir: str | os.PathLike[str], split: str, predictions: str | os.PathLike[str]
) -> dict[str, Any]:
    """Answer accuracy, overall and per question type, of predictions for one split file.

    `predictions` is what `mmfuse predict RUN --input DIR/SPLIT.jsonl --output PREDICTIONS` writes: line i is the
    prediction for record i, its answer under `{"answer": {"label": ...}}` (a plain `{"answer": "..."}` works too).
    """
    records, path = load_split(out_dir, split), Path(predictions)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(records):
        raise DataError(f"{path}: {len(lines)} predictions for the {len(records)} records of {split}.jsonl")
    hits: dict[str, list[bool]] = defaultdict(list)
    for number, (line, r) in enumerate(zip(lines, records), start=1):
        hits[r["question_type"]].append(_predicted_answer(line, f"{path}:{number}") == r["answer"])
    every = [h for hs in hits.values() for h in hs]
    return {
        "split": split,
        "questions": len(every),
        "accuracy": sum(every) / len(every) if every else 0.0,
        "by_type": {t: {"questions": len(h), "accuracy": sum(h) / len(h)} for t, h in sorted(hits.items())},
    }


def format_score(score: Mapping[str, Any]) -> str:
    """The score as a small plain-text table."""
    lines = [f"{score['split']}: answer accuracy {score['accuracy']:.2%} on {score['questions']} questions"]
    lines += [f"  {t:<12} {d['questions']:>6}  {d['accuracy']:>7.2%}" for t, d in score["by_type"].items()]
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m mmfuse.datasets.relations ARGS` is `mmfuse data relations ARGS`
    from mmfuse.cli import main

    sys.exit(main(["data", "relations", *sys.argv[1:]]))
