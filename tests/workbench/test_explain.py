"""`mmfuse explain` on tiny trained runs: the numbers are checked against computations made here from the model's
own weights (never read back from the explainer), the picture is a valid PNG, errors are one line with exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from mmfuse.cli import main
from mmfuse.data.records import DataError
from mmfuse.encoders.base import EncoderOutput
from mmfuse.workbench.explain import Explainer
from tiny import run_config, tiny_model, write_dataset

QUESTION = "is this a square?"
RUNS: dict[str, dict[str, Any]] = {
    "concat": {},
    "sum": {},
    "gated": {"gate_on": "text"},
    "film": {},
    "cross_attention": {"direction": "text_to_image", "query": "tokens"},
    "co_attention": {"hidden_dim": 16, "num_layers": 1},
    "relation": {"g_layers": 2, "g_dim": 16, "f_dim": 16},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Any:
    """`runs(name)`: a run of fusion `name` trained for one epoch (trained on first use, then kept)."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(name: str) -> Path:
        if name not in made:
            cfg = run_config(data, max_epochs=1, cache_dir=str(root / "cache"))
            if name == "text_only":
                cfg["model"] = tiny_model("concat")
                del cfg["model"]["encoders"]["image"]
            else:
                cfg["model"] = tiny_model(name, **RUNS[name])
            if "attention" in name or name == "relation":  # spatial tokens: a 3 x 3 grid from resnet18 at 96 px
                cfg["model"]["encoders"]["image"].update(tokens=True, image_size=96)
            (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            assert main(["train", str(root / f"{name}.yaml"), "--out", str(root / name)]) == 0
            made[name] = root / name
        return made[name]

    return get


def explain(run: Path, data: Path, method: str = "auto") -> tuple[Explainer, Any, dict[str, EncoderOutput]]:
    """(explainer, explanation, the record's encoder features computed here)."""
    ex = Explainer(run, method=method)
    record = ex.record({"image": str(data.parent / "images" / "2.png"), "text": QUESTION})
    explanation = ex.explain(record)
    batch = next(ex.predictor.batches([record], 1))
    with torch.no_grad():
        features = {m: ex.model.encoders[m](batch["inputs"][m]) for m in ex.model.encoders}
    return ex, explanation, features


def top_logits(ex: Explainer, fused: torch.Tensor) -> dict[str, tuple[int, float, torch.Tensor, float]]:
    """{task: (argmax, its logit, head weight row, head bias)} from the (linear) heads, computed here."""
    out = {}
    for name, head in ex.model.heads.items():
        (linear,) = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        logits = fused @ linear.weight.T + linear.bias
        c = int(logits[0].argmax())
        out[name] = (c, float(logits[0, c]), linear.weight[c], float(linear.bias[c]))
    return out


# ---------------------------------------------------------------------------------------------- exact decomposition
def test_concat_contributions_are_the_exact_column_blocks(runs, data: Path) -> None:
    ex, explanation, feats = explain(runs("concat"), data)
    fc = ex.model.fusion.fc_out
    x = {m: feats[m].pooled for m in ("image", "text")}
    with torch.no_grad():
        fused = torch.cat([x["image"], x["text"]], dim=1) @ fc.weight.T + fc.bias
        d_image = x["image"].shape[1]
        blocks = {"image": fc.weight[:, :d_image], "text": fc.weight[:, d_image:]}
        for task, (c, logit, w, b) in top_logits(ex, fused).items():
            got = explanation.report["contributions"][task]
            assert got["method"] == "exact" and got["index"] == c
            assert got["logit"] == pytest.approx(logit, abs=1e-4)
            for m in ("image", "text"):
                assert got["modalities"][m] == pytest.approx(float(x[m][0] @ blocks[m].T @ w), abs=1e-4), (task, m)
            assert got["baseline"] == pytest.approx(float(fc.bias @ w) + b, abs=1e-4)
            total = sum(got["modalities"].values())
            assert total == pytest.approx(logit - got["baseline"], abs=1e-4)  # contributions = logit minus bias


def test_sum_contributions_are_each_projection_through_the_head(runs, data: Path) -> None:
    ex, explanation, feats = explain(runs("sum"), data)
    fc = ex.model.fusion.fc
    with torch.no_grad():
        terms = {m: feats[m].pooled @ fc[m].weight.T + fc[m].bias for m in ("image", "text")}
        for task, (_, logit, w, b) in top_logits(ex, terms["image"] + terms["text"]).items():
            got = explanation.report["contributions"][task]
            for m in ("image", "text"):
                assert got["modalities"][m] == pytest.approx(float(terms[m][0] @ w), abs=1e-4)
            assert got["baseline"] == pytest.approx(b, abs=1e-5)
            assert sum(got["modalities"].values()) == pytest.approx(logit - b, abs=1e-4)


def test_integrated_gradients_on_an_affine_model_equal_the_exact_terms(runs, data: Path) -> None:
    """The captum path: IG from zero features on concat + linear heads is exactly the column-block terms."""
    pytest.importorskip("captum")
    _, exact, _ = explain(runs("concat"), data, "exact")
    _, ig, _ = explain(runs("concat"), data, "integrated_gradients")
    for task, want in exact.report["contributions"].items():
        got = ig.report["contributions"][task]
        assert got["method"] == "integrated_gradients"
        for m, value in want["modalities"].items():
            assert got["modalities"][m] == pytest.approx(value, abs=1e-3), (task, m)
        assert got["baseline"] == pytest.approx(want["baseline"], abs=1e-4)


class TanhHead(torch.nn.Module):
    """A custom head whose one layer is a Linear but which is not affine: tanh(fc(x))."""

    def __init__(self, fc: torch.nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def test_a_custom_head_that_is_not_affine_is_never_decomposed_exactly(runs, data: Path) -> None:
    """A head is linear only when its forward is known to be (a Linear, an MLPHead without hidden layers): one
    Linear among a custom head's layers says nothing about what its forward does with it."""
    pytest.importorskip("captum")
    ex = Explainer(runs("concat"))
    for name, head in list(ex.model.heads.items()):
        (linear,) = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        ex.model.heads[name] = TanhHead(linear)
    record = ex.record({"image": str(data.parent / "images" / "2.png"), "text": QUESTION})
    for task, got in ex.explain(record).report["contributions"].items():
        assert got["method"] != "exact", task
    ex.method = "exact"
    with pytest.raises(DataError, match="a head is not linear"):
        ex.explain(record)


# ---------------------------------------------------------------------------------------------- gated, film
def test_gated_reports_its_gate_and_attributes_with_captum(runs, data: Path) -> None:
    pytest.importorskip("captum")
    ex, explanation, feats = explain(runs("gated"), data)
    fusion = ex.model.fusion
    with torch.no_grad():
        gate = torch.sigmoid(fusion.fc["text"](feats["text"].pooled))[0]  # gate_on: text
    got = explanation.report["gate"]
    assert got["gate_on"] == "text" and got["gated"] == "image"
    assert got["values"] == pytest.approx(gate.tolist(), abs=1e-5)
    assert got["mean"] == pytest.approx(float(gate.mean()), abs=1e-5)
    assert got["open_fraction"] == pytest.approx(float((gate > 0.5).float().mean()))
    assert sum(got["histogram"]["counts"]) == gate.numel()
    for c in explanation.report["contributions"].values():  # IG completeness: terms sum to logit - baseline
        assert c["method"] == "integrated_gradients" and "note" not in c
        assert sum(c["modalities"].values()) == pytest.approx(c["logit"] - c["baseline"], abs=max(1e-3, c["delta"]))


def test_integrated_gradients_that_do_not_add_up_are_replaced_in_auto_and_flagged_when_asked(
    runs, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("captum")
    import mmfuse.workbench.explain as explain_module

    real = explain_module.captum_terms

    def off(*args: Any) -> dict[str, Any]:  # the real terms, with a completeness error far above tolerance
        terms = real(*args)
        if terms["method"] == "integrated_gradients":
            terms["delta"] = 1e6
        return terms

    monkeypatch.setattr(explain_module, "captum_terms", off)
    _, auto, _ = explain(runs("gated"), data)
    _, ablated, _ = explain(runs("gated"), data, "feature_ablation")
    for task, c in auto.report["contributions"].items():
        assert c["method"] == "feature_ablation" and "do not add up" in c["note"]
        assert c["modalities"] == pytest.approx(ablated.report["contributions"][task]["modalities"])
    _, asked, _ = explain(runs("gated"), data, "integrated_gradients")
    for c in asked.report["contributions"].values():
        assert c["method"] == "integrated_gradients" and "--attribution feature_ablation" in c["note"]


def test_auto_attribution_of_a_normalising_fusion_adds_up_or_says_it_was_replaced(runs, data: Path) -> None:
    pytest.importorskip("captum")
    _, explanation, _ = explain(runs("co_attention"), data)
    for c in explanation.report["contributions"].values():
        if c["method"] == "integrated_gradients":
            change = abs(c["logit"] - c["baseline"])
            assert c["delta"] <= max(0.05 * change, 1e-3) and "note" not in c
        else:
            assert c["method"] == "feature_ablation" and "do not add up" in c["note"]


def test_feature_ablation_is_the_logit_drop_when_a_modality_is_zeroed(runs, data: Path) -> None:
    pytest.importorskip("captum")
    ex, explanation, feats = explain(runs("gated"), data, "feature_ablation")
    with torch.no_grad():
        for task, got in explanation.report["contributions"].items():
            head, c = ex.model.heads[task], got["index"]
            for m in ("image", "text"):
                zeroed = {
                    k: EncoderOutput(torch.zeros_like(f.pooled) if k == m else f.pooled) for k, f in feats.items()
                }
                drop = got["logit"] - float(head(ex.model.fusion(zeroed).fused)[0, c])
                assert got["modalities"][m] == pytest.approx(drop, abs=1e-4), (task, m)


def test_film_reports_gamma_and_beta(runs, data: Path) -> None:
    ex, explanation, feats = explain(runs("film"), data)
    fusion = ex.model.fusion
    with torch.no_grad():
        gamma, beta = fusion.fc(feats["text"].pooled)[0].split(fusion.hidden_dim)
    film = explanation.report["film"]
    assert film["condition_on"] == "text" and film["target"] == "image"
    for name, want in (("gamma", gamma), ("beta", beta)):
        assert film[name]["values"] == pytest.approx(want.tolist(), abs=1e-5)
        assert film[name]["std"] == pytest.approx(float(want.std(unbiased=False)), abs=1e-5)
        assert (film[name]["min"], film[name]["max"]) == pytest.approx((float(want.min()), float(want.max())))


# ---------------------------------------------------------------------------------------------- attention
def test_cross_attention_map_over_the_image_grid(runs, data: Path) -> None:
    ex, explanation, feats = explain(runs("cross_attention"), data)
    fusion = ex.model.fusion
    (entry,) = explanation.report["attention"]
    assert (entry["query"], entry["key"]) == ("text", "image")
    tokens = feats["image"].tokens  # (1, T, D)
    assert entry["grid"] == [3, 3] and len(entry["weights"]) == tokens.shape[1] == 9
    assert sum(entry["weights"]) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # softmax(q k^T / sqrt(d_h)) per head, averaged over heads and the text tokens
        heads = fusion.num_heads
        text = feats["text"].tokens[0]  # pre-norm inputs, positions on the projected tokens (1-D text, 2-D image)
        q = fusion.q_proj(fusion.norm_q(text)) + fusion._positions("text", text[None])
        k = fusion.k_proj(fusion.norm_k(tokens[0])) + fusion._positions("image", tokens)
        q, k = (x.unflatten(-1, (heads, -1)).transpose(0, 1) for x in (q, k))  # (H, Q, d_h), (H, T, d_h)
        rows = ((q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5).softmax(-1)  # (H, Q, T)
        assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:2]))
        want = rows.mean(0)[feats["text"].mask[0]].mean(0)
    assert entry["weights"] == pytest.approx(want.tolist(), abs=1e-5)


@pytest.mark.slow  # trains one more run
def test_co_attention_maps_both_ways(runs, data: Path) -> None:
    ex, explanation, feats = explain(runs("co_attention"), data)
    maps = {(a["query"], a["key"]): a for a in explanation.report["attention"]}
    assert set(maps) == {("image", "text"), ("text", "image")}
    assert maps["text", "image"]["grid"] == [3, 3]
    words = maps["image", "text"]
    assert words["tokens"][0] == "[CLS]" and len(words["tokens"]) == feats["text"].tokens.shape[1]
    for entry in maps.values():
        assert sum(entry["weights"]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------- relation pairs
def test_relation_reports_its_heaviest_pairs_and_draws_them(runs, data: Path, tmp_path: Path, capsys) -> None:
    ex, explanation, feats = explain(runs("relation"), data)
    fusion = ex.model.fusion
    tokens = feats["image"].tokens[0]  # (9, C): a 3 x 3 grid
    xy = torch.tensor([[x, y] for y in (-1.0, 0.0, 1.0) for x in (-1.0, 0.0, 1.0)])  # (column, row) of each cell
    with torch.no_grad():  # ||g([o_i; o_j; q])|| with g's first layer on the concatenation, computed here
        objects = torch.cat([tokens, xy], dim=1)
        parts = (fusion.g_in_i, fusion.g_pos_i, fusion.g_in_j, fusion.g_pos_j, fusion.g_in_q)
        first = torch.cat([layer.weight for layer in parts], dim=1)
        q = feats["text"].pooled[0]
        norms = torch.tensor(
            [
                [fusion.g(torch.relu(first @ torch.cat([objects[i], objects[j], q]) + fusion.g_in_q.bias)).norm()
                 for j in range(9)]
                for i in range(9)
            ]
        )  # fmt: skip
    pairs = explanation.report["pairs"]
    assert (pairs["modality"], pairs["grid"], pairs["weight"], pairs["real_pairs"]) == (
        "image",
        [3, 3],
        "norm of g",
        81,
    )
    values, index = norms.flatten().topk(8)
    assert [(p["i"], p["j"]) for p in pairs["top"]] == [divmod(k, 9) for k in index.tolist()]
    assert [p["weight"] for p in pairs["top"]] == pytest.approx(values.tolist(), rel=1e-4)
    assert pairs["top"][0]["share"] == pytest.approx(float(values[0] / norms.sum()), rel=1e-4)
    assert all(p["cells"] == [list(divmod(p["i"], 3)), list(divmod(p["j"], 3))] for p in pairs["top"])

    from matplotlib.figure import Figure

    from mmfuse.workbench.explain_figure import _image

    ax = Figure().add_subplot()
    _image(ax, "image", explanation.images["image"], None, pairs)
    assert len(ax.lines) == 8 and "top 8 of 81 pairs of its 3x3 cells" in ax.get_title()
    side = explanation.images["image"].size[0]
    first_pair = next(line for line, p in zip(ax.lines, pairs["top"]) if p["i"] != p["j"])
    cells = next(p["cells"] for p in pairs["top"] if p["i"] != p["j"])
    want_x = [(c[1] + 0.5) * side / 3 - 0.5 for c in cells]  # the cells' centres in pixels
    assert list(first_pair.get_xdata()) == pytest.approx(want_x)

    out = tmp_path / "pairs.png"
    image = str(data.parent / "images" / "2.png")
    assert main(["explain", str(runs("relation")), "--image", image, "--text", QUESTION, "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["pairs"]["top"][0]["i"] == pairs["top"][0]["i"]
    with Image.open(out) as im:
        assert im.format == "PNG"
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- the command
def test_the_command_writes_a_png_and_the_json_beside_it(runs, data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "why.png"
    image = str(data.parent / "images" / "2.png")
    code = main(["explain", str(runs("cross_attention")), "--image", image, "--text", QUESTION, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
        im.verify()
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["predictions"]) == {"color", "is_question", "size", "tags"}
    assert report["attention"][0]["grid"] == [3, 3]
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "color:" in printed


def _error(capsys: Any, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mmfuse explain: error: ") and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_exit_2(runs, data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    run, image, out = str(runs("concat")), str(data.parent / "images" / "2.png"), str(tmp_path / "e.png")
    assert "no text" in _error(capsys, ["explain", run, "--image", image, "--out", out])
    assert "'colour'" in _error(capsys, ["explain", run, "--field", "colour=red", "--text", QUESTION, "--out", out])
    assert "does not exist" in _error(
        capsys, ["explain", run, "--image", image, "--out", str(tmp_path / "no" / "e.png")]
    )
    assert ".png" in _error(capsys, ["explain", run, "--image", image, "--text", QUESTION, "--out", out[:-3] + "jpg"])
    assert "additive" in _error(
        capsys, ["explain", str(runs("gated")), "--image", image, "--text", QUESTION, "--attribution", "exact"]
    )
    assert "not a finished run" in _error(capsys, ["explain", str(tmp_path), "--text", QUESTION, "--out", out])
    text_only = str(runs("text_only"))  # a run without the image modality
    capsys.readouterr()  # (its training's log)
    assert "does not read 'image'" in _error(capsys, ["explain", text_only, "--image", image, "--out", out])
    monkeypatch.setitem(sys.modules, "captum", None)  # captum not installed: refused in one line
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    gated = ["explain", str(runs("gated")), "--image", image, "--text", QUESTION, "--out", out]
    assert "needs captum" in _error(capsys, gated)
    assert not Path(out).exists()


# ---------------------------------------------------------------------------------------------- POST /explain
def test_serve_explains_one_record(runs, data: Path) -> None:
    pytest.importorskip("fastapi")
    import base64
    import io
    import urllib.error
    import urllib.request

    from mmfuse.serve import ServeOptions, Server

    run, image = runs("concat"), data.parent / "images" / "2.png"
    _, local, _ = explain(run, data)
    server = Server(run, ServeOptions(port=0, device="cpu"))
    try:
        url = server.start()

        def post(payload: Any, query: str = "") -> tuple[int, bytes, str]:
            body = json.dumps(payload).encode()
            req = urllib.request.Request(url + "/explain" + query, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as reply:
                    return reply.status, reply.read(), reply.headers["content-type"]
            except urllib.error.HTTPError as err:
                return err.code, err.read(), err.headers["content-type"]

        record = {"image": base64.b64encode(image.read_bytes()).decode(), "text": QUESTION}
        status, body, _ = post(record)
        assert status == 200
        reply = json.loads(body)
        for task, want in local.report["contributions"].items():  # the same numbers as `mmfuse explain`
            got = reply["contributions"][task]
            assert (got["output"], got["method"]) == (want["output"], want["method"])
            assert got["modalities"] == pytest.approx(want["modalities"], abs=1e-5)
            assert got["logit"] == pytest.approx(want["logit"], abs=1e-5)
        assert "inputs" not in reply  # no server upload paths
        head, _, png = reply["image"].partition(",")
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(png))) as im:
            assert im.format == "PNG" and im.width > 300
        status, body, kind = post(record, "?format=png")
        assert status == 200 and kind == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
        status, body, _ = post([record, record])
        assert status == 422 and "one record" in json.loads(body)["error"]
        status, body, _ = post({"text": QUESTION})
        assert status == 422 and "no image" in json.loads(body)["error"]
    finally:
        server.stop()
