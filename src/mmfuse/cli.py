"""`mmfuse` command line: train, evaluate, predict, explain, serve, list, cache, bench, compare, data, init. The only
module that prints.

Startup is kept fast: this module imports only the standard library. Each `cmd_*` function checks its
arguments and config first and imports torch, Lightning or transformers (through mmfuse's modules) only
after that, inside the function, so `--help`, `list` and every argument or config error answer at once.
A new command follows the same pattern; tests/test_cli_startup.py checks it in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from mmfuse.text import one_line

EPILOG_TRAIN = """examples:
  mmfuse train                                   # built-in easy-VQA run, packaged encoders, CPU
  mmfuse train configs/easy_vqa_film.yaml --out runs/film
  mmfuse train my.yaml --set train.max_epochs=3 --set model.fusion.name=gated
  mmfuse train --out runs/film --resume          # continue an interrupted run
  mmfuse train my.yaml --set train.devices=2 --set train.strategy=ddp   # 2 processes (GPUs, or CPU with gloo)
"""


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse answers a bad value with one usage line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


_FMT = argparse.RawDescriptionHelpFormatter


def _subcommands(parser: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
    """Sub-parsers of `parser` (chosen one named in `args.<dest>`) whose --help keeps the line breaks of their
    descriptions and epilogs (the examples)."""
    return parser.add_subparsers(
        dest=dest, required=True, parser_class=partial(argparse.ArgumentParser, formatter_class=_FMT)
    )


def _add_config(parser: argparse.ArgumentParser) -> None:
    """The optional run config positional (train, bench, compare)."""
    parser.add_argument("config", nargs="?", help="YAML run config (default: the built-in easy-VQA config)")


def _add_repeatable(parser: argparse.ArgumentParser, flag: str, metavar: str, text: str) -> None:
    """A repeatable option: its `args` entry is the list of the values given ([] when none)."""
    parser.add_argument(flag, action="append", default=[], metavar=metavar, help=text)


def _add_set(parser: argparse.ArgumentParser, text: str = "override a config key (repeatable)") -> None:
    """--set KEY=VALUE, repeatable (`text`: its help)."""
    _add_repeatable(parser, "--set", "KEY=VALUE", text)


def _parser() -> argparse.ArgumentParser:
    """The `mmfuse` parser: one sub-parser per command, each added by its `_add_<command>` (in `--help` order)."""
    p = argparse.ArgumentParser(
        prog="mmfuse",
        description="Multi-task, multi-modal learning (images, texts and any other modality with an encoder).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = _subcommands(p, "command")
    for add in (
        _add_train,
        _add_evaluate,
        _add_predict,
        _add_explain,
        _add_serve,
        _add_list,
        _add_cache,
        _add_bench,
        _add_compare,
        _add_data,
        _add_export,
        _add_pack,
        _add_init,
    ):
        add(sub)
    return p


def _global_zero() -> bool:
    """Global rank 0 (across nodes every node has a LOCAL_RANK 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train from a YAML config",
        epilog=EPILOG_TRAIN,
        description="Train a model; writes checkpoints, metrics.json and report.md to the run directory.",
    )
    _add_config(t)
    _add_set(t, "override a config key, e.g. --set train.max_epochs=3 (repeatable; values parsed as YAML)")
    t.add_argument("--out", help="run directory (default: runs/<name>-<date>-<time>); with --resume, the run to resume")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.ckpt")
    t.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records (missing/unreadable image, empty text, unknown label), list them in the report",
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate",
        help="per-task metrics of a finished run",
        epilog="examples:\n  mmfuse evaluate runs/easy_vqa\n  mmfuse evaluate runs/easy_vqa --split val --json\n"
        "  mmfuse evaluate runs/easy_vqa --drop image                      # the image absent from every record\n"
        "  mmfuse evaluate runs/easy_vqa --corrupt image=noise:0.1 --corrupt text=word_dropout:0.5 --seed 1\n"
        "corruption kinds (severity in [0, 1]): image noise, blur, occlude; text word_dropout, shuffle; any absent",
    )
    e.add_argument("run", help="run directory (holds config.yaml and model.safetensors)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split (default: test)")
    _add_set(e, "override data keys, e.g. --set data.test=other.jsonl")
    e.add_argument("--skip-bad", action="store_true", help="skip bad records instead of stopping")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_repeatable(e, "--drop", "MODALITY", "evaluate with this modality absent (repeatable)")
    _add_repeatable(
        e,
        "--corrupt",
        "MODALITY=KIND:SEVERITY",
        "corrupt a modality's raw inputs before encoding, e.g. image=noise:0.1 (repeatable: applied together)",
    )
    e.add_argument("--seed", type=int, help="seed of the corruption draws (default 0)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "predict",
        help="predict with a finished run",
        description="Predict every task of a run from its inputs: a records file, a split of a shard folder (mmfuse "
        "pack; streamed, bounded memory), or field values given here.",
        epilog="examples:\n  mmfuse predict runs/easy_vqa --image shape.png --text 'what color is the shape?'\n"
        "  mmfuse predict runs/easy_vqa --input records.jsonl --output preds.jsonl\n"
        "  mmfuse predict runs/my --input shards/my --split test --output preds.jsonl   # a split of a shard set\n"
        "  mmfuse predict runs/products --field price_band=high --field photo=shoe.jpg   # any input field\n"
        "  mmfuse predict runs/easy_vqa --text 'is there a circle?' --allow-missing     # text only\n"
        "  mmfuse export runs/easy_vqa && mmfuse predict runs/easy_vqa --engine onnx --image shape.png --text '...'",
    )
    pr.add_argument("run", help="run directory")
    _add_record_inputs(pr)
    pr.add_argument(
        "--input",
        help="records file (.jsonl, .json or .csv) with the run's input fields, or a shard folder (mmfuse pack)",
    )
    pr.add_argument("--split", help="with a shard folder as --input: the split to predict (default: test)")
    pr.add_argument(
        "--root",
        "--image-root",
        dest="root",
        help="folder that file paths in --input are relative to and confined to (default: its folder)",
    )
    pr.add_argument("--allow-outside-root", action="store_true", help="accept paths in --input outside --root")
    pr.add_argument(
        "--allow-missing",
        action="store_true",
        help="predict records that lack some of the run's inputs (a warning if the model was not trained for it)",
    )
    pr.add_argument("--skip-bad", action="store_true", help="skip bad records instead of stopping, and list them")
    pr.add_argument("--output", help="write predictions as JSONL here instead of printing them")
    pr.add_argument("--batch-size", type=_positive_int, default=64, help="records per forward pass (default 64)")
    pr.add_argument("--top", type=int, default=3, help="classes shown per task in the terminal (default 3)")
    pr.add_argument(
        "--engine",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="onnx: the run's ONNX export (mmfuse export RUN) with onnxruntime, without importing torch (fast to "
        "start); torch: the PyTorch model; auto (default): onnx when the run holds a current export it can run, "
        "else torch (-v says which ran and why)",
    )
    pr.add_argument("--onnx", metavar="DIR", help="the ONNX export folder the onnx engine runs (default: RUN/export)")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser(
        "explain",
        help="explain one prediction: a picture and JSON (contributions, attention, gates, FiLM)",
        description="Explain one prediction of a run: each task's answer, each modality's contribution to it, "
        "and the fusion's attention weights, gates or FiLM statistics. Writes a PNG and a JSON beside it.",
        epilog="examples:\n  mmfuse explain runs/easy_vqa --image shape.png --text 'what color is the shape?'\n"
        "  mmfuse explain runs/products --field photo=shoe.jpg --field caption='a red boot' --out boot.png\n"
        "  mmfuse explain runs/easy_vqa --image shape.png --text 'is it blue?' --attribution feature_ablation",
    )
    ex.add_argument("run", help="run directory")
    _add_record_inputs(ex)
    ex.add_argument(
        "--out", default="explain.png", help="the picture (.png); the JSON goes beside it (default explain.png)"
    )
    ex.add_argument(
        "--attribution",
        default="auto",
        choices=["auto", "exact", "integrated_gradients", "feature_ablation"],
        help="how contributions are computed (default auto: exact for sum/concat with linear heads, else "
        "integrated gradients; the last two need captum: pip install 'mmfuse[explain]')",
    )
    ex.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    ex.add_argument("--allow-missing", action="store_true", help="explain a record that lacks some of the run's inputs")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser(
        "serve",
        help="serve a finished run over HTTP (dynamic batching, demo page at /)",
        description="Answer POST /predict (JSON or multipart: the run's input fields; files as uploads), GET /info, "
        "GET /health and a demo page at /. Needs the serve extra: pip install 'mmfuse[serve]'.",
        epilog="examples:\n  mmfuse serve runs/easy_vqa                        # http://127.0.0.1:8000/\n"
        "  mmfuse serve runs/easy_vqa --port 0 --max-batch 64 --max-wait-ms 10 --workers 2\n"
        "  curl -s localhost:8000/predict -H 'content-type: application/json' \\\n"
        '       -d \'{"image": "\'$(base64 -w0 shape.png)\'", "text": "what color is the shape?"}\'\n'
        "  curl -s localhost:8000/predict -F image=@shape.png -F text='what color is the shape?'",
    )
    sv.add_argument("run", help="run directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    sv.add_argument("--max-batch", type=int, default=32, help="most records in one forward pass (default 32; 1: off)")
    sv.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="longest a batch waits for more requests (default 5)"
    )
    sv.add_argument("--workers", type=int, default=1, help="inference threads, each with a model copy (default 1)")
    sv.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MB (default 16)")
    sv.add_argument("--max-records", type=int, default=64, help="most records in one request (default 64)")
    sv.add_argument(
        "--max-image-pixels", type=int, default=25_000_000, help="largest uploaded image in pixels (default 25M)"
    )
    sv.add_argument(
        "--allow-missing", action="store_true", help="accept records that lack an input the model was trained with"
    )


def _add_list(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "list",
        help="registered encoders, fusions, task kinds, weightings and balancers",
        epilog="example:\n  mmfuse list",
    )


def _add_cache(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "cache",
        help="the frozen-encoder feature cache",
        epilog="examples:\n  mmfuse cache info\n  mmfuse cache clear\n  MMFUSE_CACHE_DIR=/scratch/c mmfuse cache info",
    )
    c.add_argument(
        "action",
        choices=["info", "clear"],
        help="info: where it is and its size; clear: delete the files the cache wrote (nothing else)",
    )
    c.add_argument("--dir", help="cache directory (default: $MMFUSE_CACHE_DIR or ~/.cache/mmfuse/features)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="multi-task vs single-task comparison (Δm)",
        epilog="examples:\n  mmfuse bench mtl                       # built-in easy-VQA config\n"
        "  mmfuse bench mtl my.yaml --weightings equal,uncertainty,pcgrad --out runs/bench\n"
        "  mmfuse bench mtl --set train.max_epochs=3 --seeds 0,1",
    )
    b.add_argument("what", choices=["mtl"], help="mtl: one single-task model per task vs the multi-task model(s)")
    _add_config(b)
    _add_set(b)
    b.add_argument(
        "--weightings",
        default="equal",
        help="comma-separated task weightings to compare (default: equal; 'all' for every registered one)",
    )
    b.add_argument("--seeds", default="0", help="comma-separated seeds; metrics are averaged over them (default: 0)")
    b.add_argument("--out", help="directory for the runs and the report (default: runs/bench-mtl-<date>-<time>)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    cp = sub.add_parser(
        "compare",
        help="train several fusions (x seeds, x varied keys) on the same data; tables and plots",
        description="Train every fusion (and every combination of --vary values) for each seed on the same data "
        "and budget; write compare.md, compare.json and PNG plots. Rerun the same command to continue.",
        epilog="examples:\n  mmfuse compare my.yaml --fusions all --seeds 3 --out runs/cmp\n"
        "  mmfuse compare --fusions concat,film,gated --set train.max_epochs=3\n"
        "  mmfuse compare my.yaml --fusions film --vary train.balance.name=ogm_ge,agm --seeds 2\n"
        "  mmfuse compare my.yaml --fusions concat,film --stress --out runs/cmp   # + robustness curves",
    )
    _add_config(cp)
    cp.add_argument(
        "--fusions",
        default="all",
        help="comma-separated fusions, or 'all' (default: all it can feed); options per fusion in braces: "
        "'all,co_attention{hidden_dim: 128}'",
    )
    cp.add_argument("--seeds", default="3", help="number of seeds: the config's seed, +1, ... (default: 3)")
    _add_repeatable(
        cp,
        "--vary",
        "KEY=V1,V2",
        "also compare these values of a config key (repeatable; values parsed as YAML, like --set)",
    )
    _add_set(cp)
    cp.add_argument("--stress", action="store_true", help="also sweep each member over corrupted and missing inputs")
    cp.add_argument("--stress-limit", type=int, help="records per stress condition (default: the whole split)")
    cp.add_argument("--out", help="folder of the comparison (default: runs/compare-<name>-<date>-<time>)")


def _add_data(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "data",
        help="generate a built-in data set (relations, glyphs)",
        description="Generate a built-in data set into a folder: images and JSONL records that `mmfuse train` "
        "reads.\nA folder holding the same generation is reused; one holding other files is refused.",
        epilog="examples:\n  mmfuse data relations --out data/relations          # prints counts, baselines, ceiling\n"
        "  mmfuse data relations --out data/relations --score preds.jsonl --split test_combo\n"
        "  mmfuse data glyphs --out data/glyphs",
    )
    sets = _subcommands(d, "dataset")
    _add_data_relations(sets)
    _add_data_glyphs(sets)


def _add_data_relations(sets: argparse._SubParsersAction) -> None:
    r = sets.add_parser(
        "relations",
        help="VQA about several objects: spatial relations, counting, attribute binding (docs/relations.md)",
        description="Relations: a built-in VQA set about several objects: spatial relations, counting and "
        "attribute binding.\nGenerates (or reuses) the set and prints its counts, majority baseline and text-only "
        "ceiling;\nwith --score, the answer accuracy per question type of `mmfuse predict` output instead.",
        epilog="examples:\n  mmfuse data relations --out data/relations\n"
        "  mmfuse predict runs/relations --input data/relations/test.jsonl --output preds.jsonl\n"
        "  mmfuse data relations --out data/relations --score preds.jsonl",
    )
    r.add_argument(
        "--out", required=True, metavar="DIR", help="folder to generate into (reused when it holds the same generation)"
    )
    r.add_argument("--seed", type=int, help="generation seed (default 0)")
    r.add_argument("--train-images", type=int, metavar="N", help="train scenes (default 4000)")
    r.add_argument("--val-images", type=int, metavar="N", help="val scenes (default 500)")
    r.add_argument("--test-images", type=int, metavar="N", help="test scenes (default 1000)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--score", metavar="PREDICTIONS", help="score `mmfuse predict` output for --split of --out instead")
    r.add_argument(
        "--split",
        choices=["train", "val", "test", "test_combo"],
        help="the split that --score scores (default test)",
    )


def _add_data_glyphs(sets: argparse._SubParsersAction) -> None:
    g = sets.add_parser(
        "glyphs",
        help="VQA about one rotated, cluttered digit, for fine-tuning recipes (docs/finetune.md)",
        description="Glyphs: a generated VQA set of digits where frozen ImageNet features are weak, for fine-tuning "
        "recipes.\nThree questions per image (the digit, even, greater than four).",
        epilog="example:\n  mmfuse data glyphs --out data/glyphs --train 1000",
    )
    g.add_argument("--out", default="data/glyphs", metavar="DIR", help="folder to generate into (default data/glyphs)")
    g.add_argument(
        "--train", type=int, default=4500, metavar="N", help="training images, 3 records each (default 4500)"
    )
    g.add_argument("--val", type=int, default=300, metavar="N", help="val images (default 300)")
    g.add_argument("--test", type=int, default=300, metavar="N", help="test images (default 300)")
    g.add_argument("--size", type=int, default=64, metavar="PX", help="image side in pixels (default 64)")
    g.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")


def cmd_compare(args: argparse.Namespace) -> int:
    _quiet_lightning(args)
    from mmfuse.workbench.compare import Progress, plan_compare, run_compare

    def line(p: Progress) -> None:
        if p.status == "stressed":
            print(f"[stress {p.index}/{p.total}] {p.member.group} seed={p.member.seed} ({p.seconds:.0f} s)", flush=True)
            return
        note = {"reused": ", finished before", "resumed": ", resumed"}.get(p.status, "")
        print(
            f"[{p.index}/{p.total}] {p.member.group} seed={p.member.seed}: {p.metric} {p.value:.4f} "
            f"({p.seconds:.0f} s{note})",
            flush=True,
        )

    lib, level = logging.getLogger("mmfuse"), logging.getLogger("mmfuse").level
    if not args.verbose:  # one line per member: the runs' own info lines stay out
        lib.setLevel(logging.WARNING)
    try:
        plan = plan_compare(args.config, args.set, args.fusions, args.seeds, args.vary, args.out)
        for name, why in plan.skipped.items():
            print(f"skipped {name}: {why}", flush=True)
        print(f"{len(plan.members)} members -> {plan.out}", flush=True)
        run_compare(plan, stress=args.stress, stress_limit=args.stress_limit, progress=line)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue (finished members are kept)", file=sys.stderr)
        return 130
    finally:
        lib.setLevel(level)
    print(f"report: {plan.out / 'compare.md'}\ndata: {plan.out / 'compare.json'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mmfuse.config import load_config

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise _usage(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    load_config(args.config, args.set)  # a config error answers before the heavy imports
    _quiet_lightning(args)
    from mmfuse.bench import run_mtl_bench

    out = Path(args.out) if args.out else Path("runs") / f"bench-mtl-{time.strftime('%Y%m%d-%H%M%S')}"
    report = run_mtl_bench(args.config, args.set, args.weightings.split(","), seeds, out)
    print(report)
    print(f"\nreport: {out / 'delta_m.md'}")
    return 0


def _quiet_lightning(args: argparse.Namespace) -> None:
    """Import Lightning (only commands that train or evaluate need it) and keep its info lines out, unless -v."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels on import: override them after)

    if not args.verbose:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from mmfuse.config import load_config

    overrides = list(args.set) + (["data.skip_bad=true"] if args.skip_bad else [])
    if args.resume:
        if not args.out:
            raise _usage("--resume needs --out RUN_DIR")
        from mmfuse.runs import resume_config

        cfg = resume_config(args.out, overrides)  # only what may change on resume (mmfuse.runs.RESUME_MAY_CHANGE)
    else:
        cfg = load_config(args.config, overrides)
    _quiet_lightning(args)  # after the config is read: a config error answers before the heavy imports
    from mmfuse.builders import run_outline
    from mmfuse.train.run import train

    out = Path(args.out) if args.out else _default_run_dir(run_outline(cfg).name)  # the name was checked in cfg

    summary = train(cfg, out, resume=args.resume)
    if summary.get("world_size", 1) > 1 and not _global_zero():
        return 0
    print(f"\nrun directory: {out}")
    for split in ("test", "val"):
        if split in summary["metrics"]:
            print(f"\n{split} metrics (best checkpoint):")
            print(_table(summary["metrics"][split]))
            break
    print("\ntime (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()))
    if summary["bad_records"]:
        print(f"skipped {summary['bad_records']} bad records: see {out / 'bad_records.txt'}")
    print(f"report: {out / 'report.md'}")
    return 0


def _default_run_dir(name: str) -> Path:
    """runs/<name>-<date>-<time>; a name that is not one plain folder name is refused (never outside runs/)."""
    from mmfuse.config import ConfigError, check_run_name

    try:
        check_run_name(name)
    except ValueError as err:
        raise ConfigError(f"name: {err} (got {name[:80]!r})") from None
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmfuse.config import check_run_dir, load_config

    overrides = list(args.set) + (["data.skip_bad=true"] if args.skip_bad else [])
    if args.seed is not None and not (args.drop or args.corrupt):
        raise _usage("--seed only acts with --drop or --corrupt")
    load_config(check_run_dir(args.run) / "config.yaml", overrides)  # errors before the heavy imports
    _quiet_lightning(args)
    from mmfuse.train.run import evaluate

    if args.drop or args.corrupt:
        from mmfuse.workbench.stress import Stress, drop_condition, parse_condition

        seed = args.seed if args.seed is not None else 0
        conditions = [drop_condition(m) for m in args.drop] + [parse_condition(c) for c in args.corrupt]
        table = Stress(args.run, args.split, overrides, seed=seed, conditions=conditions).evaluate(conditions)
        if not args.json:
            print("condition: " + ", ".join(f"{c.option} {c}" for c in conditions) + f" (seed {seed})")
    else:
        table = evaluate(args.run, args.split, overrides)
    print(json.dumps(table, indent=2) if args.json else _table(table))
    return 0


def _add_record_inputs(parser: argparse.ArgumentParser) -> None:
    """--image, --text and --field NAME=VALUE: the inputs of one record (read by `_field_values`)."""
    for modality, value in (("image", "PATH"), ("text", "TEXT")):
        shorthand = f"shorthand for --field <its field>={value}"
        parser.add_argument(f"--{modality}", help=f"the input of the run's `{modality}` modality ({shorthand})")
    _add_repeatable(
        parser,
        "--field",
        "NAME=VALUE",
        "an input field of one record (repeatable); a value starting with [ or { is read as JSON",
    )


def _add_shorthands(fields: dict[str, Any], shorthands: dict[str, Any], input_fields: dict[str, list[str]]) -> None:
    """Put --image / --text values into `fields` under the field the run's modality of that name reads."""
    for modality, value in shorthands.items():
        name = input_fields.get(modality, [modality])[0]
        if name in fields:
            raise _usage(f"--{modality} and --field {name}=... name the same field")
        fields[name] = value


def _shorthands(args: argparse.Namespace) -> dict[str, Any]:
    """{modality: value} of the --image and --text given."""
    return {m: v for m, v in (("image", args.image), ("text", args.text)) if v is not None}


def _field_values(args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} from --image, --text and --field NAME=VALUE (JSON for values starting with [ or {)."""
    fields: dict[str, Any] = {}
    for item in args.field:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise _usage(f"--field {item!r}: expected NAME=VALUE, e.g. --field caption='a red boot'")
        if name.strip() in fields:
            raise _usage(f"--field {name.strip()!r} is given twice")
        if value.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise _usage(f"--field {name.strip()}: the value starts like JSON but is not valid JSON") from None
        fields[name.strip()] = value
    return fields


def cmd_predict(args: argparse.Namespace) -> int:
    from mmfuse.config import check_run_dir

    fields = _field_values(args)
    shorthands = _shorthands(args)
    if args.input and (fields or shorthands):
        raise _usage("give either --input or field values (--image/--text/--field), not both")
    if not (args.input or fields or shorthands):
        raise _usage("give --input FILE, or the inputs of one record (--image, --text, --field NAME=VALUE)")
    shards = bool(args.input) and Path(args.input).is_dir()
    if args.split is not None and not shards:
        raise _usage("--split names a split of a shard folder given as --input (written by mmfuse pack)")
    if shards and (args.root or args.allow_outside_root):
        raise _usage(
            "--root and --allow-outside-root apply to a records file; a shard set's paths were checked when packed"
        )
    if args.onnx is not None and args.engine == "torch":
        raise _usage("--onnx names the export the onnx engine runs; it does not go with --engine torch")
    check_run_dir(args.run)
    predictor = _onnx_predictor(args, shards) if args.engine != "torch" else None
    if predictor is not None:
        try:
            return _predict(args, predictor, fields, shorthands, shards)
        except Exception as err:  # a record the graph cannot take (one lacking an input): auto goes on with torch
            if args.engine == "onnx" or not _is(err, "mmfuse.export.runtime", "EngineError"):
                raise
            logging.getLogger("mmfuse").info("predicting with the torch engine: %s", err)
    from mmfuse.predict import Predictor  # torch, never Lightning

    logging.getLogger("mmfuse").debug("engine: torch (%s)", Path(args.run) / "model.safetensors")
    return _predict(args, Predictor(args.run), fields, shorthands, shards)


def _onnx_predictor(args: argparse.Namespace, shards: bool) -> Any:
    """The onnx engine's predictor (`--engine onnx`), or with `--engine auto` None where it cannot run (logged).
    Imports neither torch nor transformers."""
    from mmfuse.export.runtime import EngineError, OnnxPredictor

    log = logging.getLogger("mmfuse")
    try:
        if shards:
            raise EngineError(
                f"{args.input} is a shard folder; the onnx engine reads records files and field values: predict it "
                "with --engine torch"
            )
        predictor = OnnxPredictor(args.run, args.onnx)
    except EngineError as err:
        if args.engine == "onnx":
            raise
        log.debug("engine: torch, not onnx: %s", err)
        return None
    log.debug("engine: onnx (%s, onnxruntime)", predictor.model_file)
    return predictor


def _predict(
    args: argparse.Namespace, predictor: Any, fields: dict[str, Any], shorthands: dict[str, Any], shards: bool
) -> int:
    """Read, check and predict the records `args` name with `predictor` (either engine); print or write them."""
    import contextlib

    from mmfuse.io import atomic_path

    fields = dict(fields)
    _add_shorthands(fields, shorthands, predictor.input_fields)
    bad: list[tuple[str, str]] = []
    errors = bad if args.skip_bad else None
    if shards:
        split = predictor.shard_split(args.input, args.split or "test")
        chunks: Any = predictor.shard_records(split, chunk=16 * args.batch_size)  # a chunk of records at a time
    elif args.input:
        chunks = [predictor.records_from_file(args.input, args.root, args.allow_outside_root, errors)]
    else:
        chunks = [predictor.records_from_fields(fields)]
    many = split.n > 1 if shards else None  # a header line per record when the input holds several
    done = shown = 0
    with contextlib.ExitStack() as stack:  # --output: written whole or not at all (an existing file is kept on error)
        out = stack.enter_context(open(stack.enter_context(atomic_path(args.output)), "w")) if args.output else None
        for records in chunks:
            records, skipped = predictor.check(records, allow_missing=args.allow_missing, skip_bad=args.skip_bad)
            for source, reason in bad + skipped:
                print(f"skipped {source}: {reason}", file=sys.stderr)
            shown, bad = shown + len(bad) + len(skipped), []
            if records:
                many_here = len(records) > 1 if many is None else many
                _write_predictions(predictor, records, out, many_here, args.batch_size, args.top)
                done += len(records)
        if not done:  # every record was skipped: nothing predicted is not a success
            raise _usage(f"no record to predict: all {shown} were skipped as bad (listed above)")
    if args.output:
        print(f"wrote {done} predictions to {args.output}" + (f" ({shown} records skipped)" if shown else ""))
    return 0


def _write_predictions(predictor: Any, records: list[Any], out: Any, many: bool, batch_size: int, top: int) -> None:
    """Predict `records` (checked) and write them: a JSON line each to `out`, else the terminal lines (a "SOURCE:"
    header before each when `many`)."""
    for rec, res in zip(records, predictor.predict(records, batch_size)):
        if out is not None:
            out.write(json.dumps({"source": rec.source, **res}) + "\n")
            continue
        if many:
            print(f"{rec.source}:")
        for line in predictor.format(res, top):
            print(f"  {line}")


def cmd_explain(args: argparse.Namespace) -> int:
    from mmfuse.workbench.explain import Explainer, NeedsCaptum, check_out_path, write

    fields = _field_values(args)
    if args.steps < 1:
        raise _usage(f"--steps must be at least 1, got {args.steps}")
    check_out_path(args.out)
    explainer = Explainer(args.run, device="cpu", method=args.attribution, steps=args.steps)
    _add_shorthands(fields, _shorthands(args), explainer.predictor.input_fields)
    if not fields:
        raise _usage("give the inputs of one record (--image, --text, --field NAME=VALUE)")
    try:
        explanation = explainer.explain(explainer.record(fields, args.allow_missing))
    except NeedsCaptum as err:
        raise _usage(str(err)) from None
    png, js = write(explanation, args.out)
    for task, pred in explanation.report["predictions"].items():
        line = explainer.predictor.format({task: {k: v for k, v in pred.items() if k != "kind"}})[0]
        c = explanation.report["contributions"][task]
        parts = ", ".join(f"{m} {v:+.3f}" for m, v in c["modalities"].items())
        print(f"  {line}\n      {c['output']} logit {c['logit']:.3f}: {parts}, baseline {c['baseline']:+.3f}", end="")
        print(f" ({c['method']})" + (f"\n      note: {c['note']}" if c.get("note") else ""))
    print(f"wrote {png} and {js} ({explanation.report['seconds']:.2f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mmfuse.config import check_run_dir

    check_run_dir(args.run)
    try:
        from mmfuse.serve import Limits, ServeOptions, Server
    except ImportError as err:
        raise _usage(f"needs the serve extra ({err.name} is not installed): pip install 'mmfuse[serve]'") from None

    limits = Limits(int(args.max_body_mb * 2**20), args.max_records, args.max_image_pixels)
    options = ServeOptions(
        args.host, args.port, args.max_batch, args.max_wait_ms, args.workers, limits, args.allow_missing
    )
    server = Server(args.run, options)
    try:
        url = server.bind()
    except OSError as err:
        server.close()
        raise _usage(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    workers = f"{args.workers} worker" + ("s" if args.workers > 1 else "")
    print(
        f"serving {args.run} at {url}/ (max batch {args.max_batch}, wait {args.max_wait_ms:g} ms, {workers}); "
        "Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    print("stopped", flush=True)
    return 0


LISTED = (
    ("encoders", "encoder"),
    ("fusions", "fusion"),
    ("task kinds", "task kind"),
    ("weightings (train.weighting)", "weighting"),
    ("balancers (train.balance)", "balancer"),
)


def cmd_list(args: argparse.Namespace) -> int:
    from mmfuse.names import table  # read from the sources: no implementation (and no torch) is imported

    found = table()  # first: a bad MMFUSE_PLUGINS folder is one error line, not a half-printed list
    for title, kind in LISTED:
        print(f"{title}:")
        for name, entry in sorted(found.get(kind, {}).items()):
            print(f"  {name:<18} {entry.summary}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from mmfuse.data.cache import CacheError, clear_cache, default_cache_dir, scan_cache

    root = Path(args.dir) if args.dir else default_cache_dir()
    try:
        contents = scan_cache(root)
        if args.action == "clear":
            freed = clear_cache(root)
            print(f"cleared {root} ({len(contents.files)} files, {freed / 1e6:.1f} MB)")
        elif not root.exists():
            print(f"feature cache: {root}\n  empty (not created yet)")
        else:
            print(f"feature cache: {root}\n  {len(contents.files)} files, {contents.size / 1e6:.1f} MB")
    except CacheError as err:
        raise _usage(str(err)) from None
    if contents.foreign:
        shown = ", ".join(contents.foreign[:5]) + (", ..." if len(contents.foreign) > 5 else "")
        print(f"  kept {len(contents.foreign)} entries the cache did not write: {shown}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`mmfuse data relations|glyphs`: generate a built-in data set into --out and print what it holds."""
    return {"relations": _data_relations, "glyphs": _data_glyphs}[args.dataset](args)


# the generation options of `mmfuse data relations`: flag -> keyword of generate_relations (its defaults apply)
RELATIONS_OPTIONS = {
    "--seed": "seed",
    "--train-images": "n_train_images",
    "--val-images": "n_val_images",
    "--test-images": "n_test_images",
}


def _data_relations(args: argparse.Namespace) -> int:
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in RELATIONS_OPTIONS}
    given = {flag: value for flag, value in given.items() if value is not None}
    if args.score and given:
        raise _usage(f"--score reads the set in --out as it is; {', '.join(given)}: for generating only")
    if args.split and not args.score:
        raise _usage("--split only acts with --score")
    from mmfuse.datasets.relations import format_score, format_summary, generate_relations, score_predictions, summarize

    if args.score:
        score = score_predictions(args.out, args.split or "test", args.score)
        print(json.dumps(score, indent=1) if args.json else format_score(score))
        return 0
    out = generate_relations(args.out, **{RELATIONS_OPTIONS[flag]: v for flag, v in given.items()})
    summary = summarize(out)
    print(json.dumps(summary, indent=1) if args.json else f"relations data set in {out}\n\n{format_summary(summary)}")
    return 0


def _data_glyphs(args: argparse.Namespace) -> int:
    if min(args.train, args.val, args.test) < 1 or not 16 <= args.size <= 512 or args.seed < 0:
        raise _usage("--train/--val/--test must be >= 1, --size in 16..512, --seed >= 0")
    from mmfuse.datasets.glyphs import generate

    counts = generate(args.out, args.train, args.val, args.test, args.size, args.seed)
    print(", ".join(f"{s}: {n} records" for s, n in counts.items()), f"-> {args.out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser(
        "export",
        help="export a finished run's model to ONNX or TorchScript, checked against PyTorch",
        description="Write the whole model (preprocessed tensors -> every task's logits) and export.json into --out, "
        "then run the file on a batch of the run's own records and compare it with the PyTorch forward.",
        epilog="examples:\n  mmfuse export runs/easy_vqa   # into runs/easy_vqa/export, where mmfuse predict finds it\n"
        "  mmfuse export runs/easy_vqa --out exported/easy_vqa\n"
        "  mmfuse export runs/easy_vqa --format torchscript --out exported/easy_vqa_ts",
    )
    x.add_argument("run", help="run directory (holds config.yaml and model.safetensors)")
    x.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    x.add_argument(
        "--out",
        help="output directory (created): model.onnx or model.pt, export.json and the tokenizers (default: RUN/export, "
        "where `mmfuse predict RUN` finds it)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from mmfuse.export import check_request

    check_request(args.run, args.out, args.format)  # format, packages, run and --out answer before torch is imported
    from mmfuse.export import export_run, read_export_info

    path = export_run(args.run, args.out, args.format)
    info = read_export_info(path)
    check = info["check"]
    print(f"exported {path} ({info['exporter']}); inputs: {', '.join(i['name'] for i in info['inputs'])}")
    runtime, traced = check["runtime"], check["traced_records"]
    print(f"check on {check['records']} {check['split']} records, {runtime} vs PyTorch (traced on {traced}):")
    print(f"  {check['summary']}; same decisions on every task: passed")
    for task, result in check["tasks"].items():
        print(f"  {task:<20} max |diff| {result['max_abs_diff']:.3g}")
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "init",
        help="write a commented run config inferred from a CSV/JSONL table's columns",
        description="Read the table, decide each column's use (image, text, numeric, categorical, embedding; the "
        "rules of mmfuse.infer, as MultiTaskPredictor.fit), print the plan and write a YAML run config that "
        "`mmfuse train` trains as is, with a comment above each entry saying what was inferred and why.",
        epilog="examples:\n  mmfuse init products.csv --tasks color,price\n"
        "  mmfuse init items.jsonl --tasks tags --kinds tags=multilabel --inputs sku=ignore --out items.yaml",
    )
    i.add_argument("data", help="the table: .csv, or .jsonl/.json (one object per row)")
    i.add_argument("--tasks", required=True, help="the label columns, comma-separated")
    i.add_argument("--kinds", help="task kinds instead of inferred: TASK=binary|multiclass|multilabel|regression,...")
    i.add_argument(
        "--inputs",
        help="column uses instead of inferred ones: COLUMN=image|text|numeric|categorical|embedding|ignore,...",
    )
    i.add_argument("--root", help="the folder image paths are relative to (default: the data file's folder)")
    i.add_argument("--out", help="the config to write (default: <data stem>.yaml here); never overwritten")


def cmd_init(args: argparse.Namespace) -> int:
    from mmfuse.infer import PlanError

    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}.yaml")
    if out.exists():
        raise _usage(f"{out}: already exists; pass another --out or remove it")
    from mmfuse.init_config import draft_config, parse_pairs, task_kinds

    try:
        tasks = task_kinds(args.tasks, parse_pairs(args.kinds, "--kinds"))
        inputs = parse_pairs(args.inputs, "--inputs")
        draft = draft_config(Path(args.data), tasks, inputs, Path(args.root) if args.root else None, _command(args))
    except PlanError as err:
        raise _usage(str(err)) from None
    from mmfuse.config import parse_config

    parse_config(draft.config)  # a config the trainer would refuse is never written
    print(f"inputs of {args.data} ({len(draft.plan.columns)} columns, {len(draft.plan.tasks)} tasks):")
    width = max(map(len, draft.why))
    for name, why in draft.why.items():
        use = draft.plan.columns.get(name) or f"label: {draft.plan.tasks[name]}"
        print(f"  {name:<{width}}  {use:<{len('label: multiclass')}}  {why}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as f:  # "x": never overwrite, even if it appeared meanwhile
        f.write(draft.text)
    print(f"\nwrote {out}; review it, then: mmfuse train {out}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The `mmfuse init` command line as the config's first comment shows it."""
    parts = ["mmfuse init", Path(args.data).name, "--tasks", args.tasks]
    for option in ("kinds", "inputs", "root"):
        if getattr(args, option):
            parts += [f"--{option}", getattr(args, option)]
    return " ".join(parts)


def _add_pack(sub: argparse._SubParsersAction) -> None:
    pk = sub.add_parser(
        "pack",
        help="write a config's records, validated and split, into streaming shards (LitData) for data.source=shards",
        description="Read the records of each split as `train` does (same checks), fit class lists and statistics on "
        "the training split, and write the splits as LitData shards with mmfuse_manifest.json into --out. Train "
        "from them with --set data.source=shards --set data.path=DIR.",
        epilog="examples:\n  mmfuse pack my.yaml --out shards/my\n  mmfuse pack my.yaml --out shards/my --embed-files"
        "\n  mmfuse pack my.yaml --out shards/my --features      # on a shard set already there: add the features"
        "\n  mmfuse train my.yaml --set data.source=shards --set data.path=shards/my",
    )
    pk.add_argument("config", help="YAML run config whose data to pack")
    pk.add_argument("--out", required=True, help="output folder (created; must be new or empty)")
    _add_set(pk, "override a config key")
    pk.add_argument(
        "--embed-files", action="store_true", help="store the input files' bytes (images, .npy) in the shards"
    )
    pk.add_argument(
        "--chunk-bytes",
        default="16MB",
        help="the largest chunk file (LitData; default 16MB). A reader maps up to 4 chunks at a time, which count in "
        "its memory",
    )
    pk.add_argument("--skip-bad", action="store_true", help="leave bad records out (listed in the manifest)")
    pk.add_argument(
        "--features",
        action="store_true",
        help="also encode each distinct input of the frozen encoders once, into DIR/features (what train.cache "
        "reads); on a shard set packed for this config, add them or finish an interrupted pass",
    )


def cmd_pack(args: argparse.Namespace) -> int:
    from mmfuse.config import load_config

    cfg = load_config(args.config, list(args.set) + (["data.skip_bad=true"] if args.skip_bad else []))
    from mmfuse.pack import pack

    manifest = pack(cfg, args.out, embed_files=args.embed_files, chunk_bytes=args.chunk_bytes, features=args.features)
    counts = ", ".join(f"{s}: {v['records']} records" for s, v in manifest["splits"].items())
    embedded = f" (files of {', '.join(manifest['embedded'])} embedded)" if manifest["embedded"] else ""
    print(f"packed {counts} -> {args.out}{embedded}")
    if "features" in manifest:
        counts = ", ".join(f"{m}: {n} distinct inputs" for m, n in manifest["features"].items())
        print(f"features of the frozen encoders ({counts}) -> {Path(args.out) / 'features'}")
    if manifest["bad_records"]:
        print(f"skipped {len(manifest['bad_records'])} bad records: see {Path(args.out) / 'mmfuse_manifest.json'}")
    return 0


def _table(per_task: dict[str, dict[str, float]]) -> str:
    metrics = sorted({m for v in per_task.values() for m in v})
    width = max([len(t) for t in per_task] + [4])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{m:>9}" for m in metrics)]
    for task, vals in per_task.items():
        lines.append(f"{task:<{width}}  " + "  ".join(f"{vals[m]:>9.4f}" if m in vals else " " * 9 for m in metrics))
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever sys.stderr is at the time of each record (so repeated in-process calls work)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def _error(command: str, err: BaseException) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under DDP every rank stops with the error: one line, from rank 0
        print(f"mmfuse {command}: error: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lib = logging.getLogger("mmfuse")
    if not any(isinstance(h, _StderrHandler) for h in lib.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        lib.addHandler(handler)
    lib.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported (lazily)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers: dict[str, Any] = {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "predict": cmd_predict,
        "list": cmd_list,
        "cache": cmd_cache,
        "bench": cmd_bench,
        "serve": cmd_serve,
        "explain": cmd_explain,
        "compare": cmd_compare,
        "data": cmd_data,
        "export": cmd_export,
        "pack": cmd_pack,
        "init": cmd_init,
    }
    command = " ".join(name for name in (args.command, getattr(args, "dataset", None)) if name)  # "data relations"
    try:
        return handlers[args.command](args)
    except _UsageError as err:
        _error(command, err)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`mmfuse list | head`): stop without a message
        _drop_stdout()
        return 1
    except Exception as err:
        if _is(err, "mmfuse.config", "ConfigError") or _is(err, "mmfuse.data.records", "DataError"):
            _error(command, err)
            return 2
        if isinstance(err, FileNotFoundError):
            _error(command, err)
            return 2
        if _is(err, "mmfuse.train.errors", "NonFiniteError"):  # training diverged: the last good checkpoint is kept
            _error(command, err)
            return 1
        if args.verbose:
            raise
        print(
            f"mmfuse {command}: internal error: {one_line(err, 300, typed=True)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last finished checkpoint is kept (resume with --resume)", file=sys.stderr)
        return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe raises nothing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (stdout replaced in-process)
        pass


def _is(err: BaseException, module: str, name: str) -> bool:
    """Whether `err` is a `module.name`, without importing `module` (an error of it implies it is imported)."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls is not None and isinstance(err, cls)


if __name__ == "__main__":
    sys.exit(main())
