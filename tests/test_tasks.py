"""Task kinds: the registry-wide contract (every kind, built from the `example_labels` it declares, so a new kind is
covered by its one file) and the built-in kinds' own rules."""

import math

import pytest
import torch

from mmfuse.tasks import TASK_KINDS, LabelError, MLPHead, Task, build_task
from mmfuse.tasks.heads import linear_head


def make(kind: str) -> Task:
    """A task of `kind` with the options its `fit` learns from the kind's own `example_labels` (as training does)."""
    cls = TASK_KINDS.get(kind)
    return cls("t", **cls.fit(list(cls.example_labels), {}))


def sample_target(task: Task, n: int) -> torch.Tensor:
    """(n,) or (n, C) collated labels: the kind's example labels, cycled."""
    examples = type(task).example_labels
    return task.collate([task.encode(examples[i % len(examples)]) for i in range(n)])[0]


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_every_kind_declares_example_labels_that_encode_and_differ(kind: str) -> None:
    examples = TASK_KINDS.get(kind).example_labels
    assert len(examples) >= 2, f"task kind {kind!r}: declare `example_labels` (at least two raw labels)"
    task = make(kind)
    encoded = [task.encode(raw) for raw in examples]
    assert len({repr(e) for e in encoded}) >= 2, "the examples must encode to at least two different labels"
    assert task.kind == kind and task.out_dim >= 1
    head_out = MLPHead(4, task.out_dim)(torch.randn(len(encoded), 4))
    assert torch.isfinite(task.loss(head_out, task.collate(encoded)[0])).all()


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_masked_label_changes_nothing(kind: str, seed: int) -> None:
    """A sample without a label adds nothing: any value (even NaN) there leaves loss and gradients unchanged."""
    task = make(kind)
    head = MLPHead(5, task.out_dim)
    x = torch.randn(6, 5)
    target = sample_target(task, 6)
    mask = torch.tensor([True, False, True, True, False, True])

    def loss_and_grad(t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        head.zero_grad()
        loss = task.masked_loss(head(x), t, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters()]

    ref_loss, ref_grads = loss_and_grad(target)
    changed = target.clone()
    changed[~mask] = float("nan") if changed.is_floating_point() else 1
    loss, grads = loss_and_grad(changed)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    # and it equals the loss over the labelled rows alone
    assert torch.allclose(ref_loss, task.loss(head(x)[mask], target[mask]))


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_no_label_gives_zero_loss_with_graph(kind: str) -> None:
    task = make(kind)
    logits = torch.randn(3, task.out_dim, requires_grad=True)
    loss = task.masked_loss(logits, sample_target(task, 3), torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_label_encoding_and_errors() -> None:
    mc = build_task("answer", "multiclass", classes=["yes", "no", "red"])
    assert mc.encode("red") == 2
    with pytest.raises(LabelError, match="'blue' is not one of the classes"):
        mc.encode("blue")
    b = build_task("spam", "binary")
    assert [b.encode(v) for v in (1, "0", "true", False)] == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(LabelError):
        b.encode("maybe")
    ml = build_task("tags", "multilabel", classes=["x", "y", "z"])
    assert ml.encode("x|z") == [1.0, 0.0, 1.0] and ml.encode(["y"]) == [0.0, 1.0, 0.0]
    r = build_task("price", "regression")
    assert r.encode("2.5") == 2.5
    for bad in ("nan", float("nan"), "inf", "abc"):
        with pytest.raises(LabelError):
            r.encode(bad)


def test_losses_match_torch_formulas() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    mc = make("multiclass")
    expected = -(logits.log_softmax(-1)[[0, 1], [0, 2]]).mean()
    assert torch.allclose(mc.loss(logits, torch.tensor([0, 2])), expected)
    reg = build_task("r", "regression", loss="l1")
    assert math.isclose(reg.loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])).item(), 1.0)


def test_metrics_per_kind() -> None:
    mc = make("multiclass")
    m = mc.metrics()
    m.update(*mc.metric_input(torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 3.0, 0]]), torch.tensor([0, 1, 2])))
    out = m.compute()
    assert math.isclose(float(out["accuracy"]), 2 / 3, rel_tol=1e-6)
    assert set(make("binary").metrics()) == {"accuracy", "f1", "auroc"}
    assert set(make("regression").metrics()) == {"mae", "rmse"}


def test_head_shapes() -> None:
    assert MLPHead(7, 3)(torch.randn(2, 7)).shape == (2, 3)
    mlp = MLPHead(7, 3, hidden_dims=[16, 8], dropout=0.1)
    assert mlp(torch.randn(2, 7)).shape == (2, 3) and len([m for m in mlp.net if isinstance(m, torch.nn.Linear)]) == 3


@pytest.mark.parametrize(
    ("kind", "raw", "words"),
    [
        ("multiclass", {"a": 1}, "label is an object"),
        ("multiclass", ["a"], "label is a list"),
        ("multiclass", "a" * 1001, "label is 1001 characters long"),
        ("binary", {"yes": True}, "label is an object"),
        ("multilabel", [{"x": 1}], "label is an object"),
        ("multilabel", "x" * 2000, "2000 characters long"),
        ("regression", True, "regression target True is not a number"),
        ("regression", [1.0], "regression target list is not a number"),
        ("regression", 1e308, "overflows float32"),
        ("regression", 10**400, "too large for float32"),
        ("regression", 10**5000, "too large for float32"),
        ("regression", "1e999", "not finite"),
    ],
    ids=lambda v: f"int-{v.bit_length()}-bits" if isinstance(v, int) and v.bit_length() > 64 else str(v)[:16],
)
def test_labels_of_the_wrong_form_are_one_line_errors(kind: str, raw, words: str) -> None:
    with pytest.raises(LabelError) as info:
        make(kind).encode(raw)
    assert words in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 300


def test_fit_learns_classes_from_training_labels_and_keeps_given_ones() -> None:
    mc, ml = TASK_KINDS.get("multiclass"), TASK_KINDS.get("multilabel")
    labels = ["dog", " cat ", 3, "dog", {"bad": 1}, ["x"], "y" * 5000]
    assert mc.fit(labels, {"classes": None}) == {"classes": ["3", "cat", "dog"]}  # bad labels left to validation
    assert mc.fit(labels, {"classes": ["a", "b"]}) == {}
    assert ml.fit(["b|a", ["c", "a"], "b"], {"classes": None}) == {"classes": ["a", "b", "c"]}
    assert TASK_KINDS.get("regression").fit([1.0, 2.0], {}) == {}


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_collate_gives_the_kind_dtype_the_filler_and_the_mask(kind: str) -> None:
    task = make(kind)
    encoded = [task.encode(r) for r in TASK_KINDS.get(kind).example_labels[:2]]
    labels, mask = task.collate([encoded[0], None, encoded[1]])
    assert labels.dtype == task.label_dtype and mask.tolist() == [True, False, True]
    assert labels.shape[0] == 3 and labels[1].eq(torch.as_tensor(task.filler(), dtype=task.label_dtype)).all()
    for row, value in ((0, encoded[0]), (2, encoded[1])):  # as the kind's dtype holds it (0.4 is not exact)
        assert torch.equal(labels[row], torch.as_tensor(value, dtype=task.label_dtype))


@pytest.mark.parametrize("kind", TASK_KINDS.names())
def test_describe_is_json_and_format_is_one_line(kind: str, seed: int) -> None:
    import json

    task = make(kind)
    pred = task.predict(torch.randn(2, task.out_dim))
    described = task.describe(pred, 1)
    assert json.loads(json.dumps(described)) == described
    line = task.format(described, top=2)
    assert isinstance(line, str) and "\n" not in line
    if task.classes:
        probs = described["probabilities"]
        assert set(probs) == set(task.classes)
        if "label" in described:
            assert described["label"] == max(probs, key=probs.get) and described["label"] in line


@pytest.mark.parametrize("kind", [k for k in TASK_KINDS.names() if TASK_KINDS.get(k).scores_classes])
def test_true_class_probability(kind: str, seed: int) -> None:
    task = make(kind)
    logits = torch.randn(5, task.out_dim)
    target = sample_target(task, 5)
    probs = task.predict(logits)["probabilities"]  # (5, C): the probability of every class
    expected = probs[torch.arange(5), target.long()]
    torch.testing.assert_close(task.true_class_probability(logits, target), expected)


def test_linear_head_is_the_one_affine_layer_of_a_linear_head() -> None:
    plain = MLPHead(6, 3)
    assert linear_head(plain) is plain.net[0]
    with_dropout = MLPHead(6, 3, dropout=0.2)
    assert linear_head(with_dropout) is with_dropout.net[1]
    bare = torch.nn.Linear(6, 3)
    assert linear_head(bare) is bare
    assert linear_head(MLPHead(6, 3, hidden_dims=[4])) is None  # Linear, GELU, Dropout, Linear: not affine
    assert linear_head(torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU())) is None
