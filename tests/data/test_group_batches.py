"""`data.group_batches`: batches that keep records sharing an input together (mmfuse.data.grouping).

Each epoch visits every record exactly once, on one process or sharded over DDP ranks (the same number of steps
on every rank); the records of a group sit next to each other, so a batch holds few distinct inputs; a flag that
cannot act is refused with one line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from mmfuse.builders import LoaderOptions
from mmfuse.cli import main
from mmfuse.config import ConfigError, parse_config
from mmfuse.data.grouping import GroupedBatchSampler, input_groups
from mmfuse.encoders.base import UniqueInputs
from mmfuse.train.data import Features, make_loader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from scaleout import cli_env  # noqa: E402
from test_dedupe import shared_records, tiny_trainable_model  # noqa: E402

from tiny import run_config, write_dataset  # noqa: E402


def uneven_groups(n_groups: int = 13) -> torch.Tensor:
    """Group g has (g % 5) + 1 records (1..5, so groups straddle batches), records of a group not adjacent."""
    ids = [g for g in range(n_groups) for _ in range(g % 5 + 1)]
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    return torch.tensor(ids)[perm]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_every_record_once_per_epoch_on_every_sharding(world: int, batch_size: int) -> None:
    groups = uneven_groups()
    n = len(groups)
    for epoch in range(3):
        shards = []
        for rank in range(world):
            sampler = GroupedBatchSampler(groups, batch_size, seed=3, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler) == math.ceil(n / (world * batch_size))  # same steps per rank
        batches = [b for s in shards for b in s]
        assert all(0 < len(b) <= batch_size for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(n))  # each record exactly once


def test_groups_are_contiguous_so_batches_hold_few_inputs() -> None:
    groups = uneven_groups()
    sampler = GroupedBatchSampler(groups, 4, seed=0)
    batches = list(sampler)
    sequence = [groups[i].item() for b in batches for i in b]
    runs = [g for k, g in enumerate(sequence) if k == 0 or sequence[k - 1] != g]
    assert len(runs) == len(set(sequence)) == 13  # each group one unbroken run of the epoch's order
    pairs = sum(len({groups[i].item() for i in b}) for b in batches)
    assert pairs <= 13 + len(batches) - 1  # a batch boundary splits at most one group


def test_order_depends_on_seed_and_epoch_only() -> None:
    groups = uneven_groups()

    def order(seed: int, epoch: int) -> list[list[int]]:
        s = GroupedBatchSampler(groups, 4, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


def test_input_groups_by_reference_and_missing_alone() -> None:
    assert input_groups(["a", "b", "a", None, None, "b"]).tolist() == [0, 1, 0, 2, 3, 1]


def test_make_loader_groups_and_dedupes_training_batches(tmp_path: Path) -> None:
    records = shared_records(tmp_path)  # 5 images x 4 records, shuffled
    model = tiny_trainable_model()
    rows = {}
    for grouped in (False, True):
        options = LoaderOptions(batch_size=4, num_workers=0, group_batches=grouped, bucket_by_length=False)
        loader = make_loader(model, records, "train", Features(), options)
        assert len(loader) == 5
        seen, rows[grouped] = [], 0
        for batch in loader:
            seen += batch["index"].tolist()
            image = batch["inputs"]["image"]
            rows[grouped] += len(image.index.unique()) if isinstance(image, UniqueInputs) else len(image)
        assert sorted(seen) == list(range(len(records)))
    assert rows[True] <= 5 + 5 - 1 < rows[False]  # distinct images + batch boundaries, vs about one per record
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it under DDP


def test_the_grouping_modality_is_chosen_once_per_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It scans every record: chosen once per record, a 32,000-record split spent minutes before the first step."""
    import mmfuse.train.data as train_data

    calls = []
    original = train_data.grouping_modality
    monkeypatch.setattr(train_data, "grouping_modality", lambda *a: calls.append(1) or original(*a))
    records = shared_records(tmp_path)  # 20 records
    options = LoaderOptions(batch_size=4, num_workers=0, group_batches=True, bucket_by_length=False)
    make_loader(tiny_trainable_model(), records, "train", Features(), options)
    assert len(calls) == 1


def test_group_batches_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"data\.group_batches") as err:
        parse_config({**run_config(Path("r.jsonl")), "data": {"group_batches": "maybe"}})
    assert "\n" not in str(err.value)


def test_group_batches_with_only_cached_features_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    records = write_dataset(tmp_path / "data", n=12)
    cfg = run_config(records)  # both encoders frozen: every feature comes from the cache
    cfg["data"]["group_batches"] = True
    cfg["train"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(err) == 1 and err[0].startswith("mmfuse train: error: data.group_batches: every encoder")
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "refused only after encoding the features"


def test_group_batches_with_only_augmented_inputs_is_refused(tmp_path: Path) -> None:
    records = shared_records(tmp_path)
    model = tiny_trainable_model(augment=True)
    del model.encoders["text"]  # only the augmented image is encoded per batch
    options = LoaderOptions(batch_size=4, num_workers=0, group_batches=True)
    with pytest.raises(ConfigError, match="augmented at random"):
        make_loader(model, records, "train", Features(), options)


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
sys.path[:0] = {paths!r}
from test_dedupe import shared_records, tiny_trainable_model
from mmfuse.builders import LoaderOptions
from mmfuse.train.data import Features, make_loader

class Seen(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []
    def training_step(self, batch, idx):
        self.seen.append((self.current_epoch, batch["index"].tolist()))
        return (self.w * 0).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def on_train_end(self):
        out = [None, None]
        torch.distributed.all_gather_object(out, self.seen)
        if self.global_rank == 0:
            open({out!r}, "w").write(json.dumps(out))

if __name__ == "__main__":
    from pathlib import Path
    records = shared_records(Path({data!r}))
    options = LoaderOptions(batch_size=3, num_workers=0, group_batches=True)
    loader = make_loader(tiny_trainable_model(), records, "train", Features(), options, distributed=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Seen(), loader)
"""


@pytest.mark.slow
def test_under_ddp_lightning_keeps_the_sampler_and_each_record_is_seen_once_per_epoch(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    script = tmp_path / "ddp_group.py"
    out = tmp_path / "seen.json"
    paths = [str(tests), str(tests / "train")]
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(paths=paths, out=str(out), data=str(tmp_path / "data"))))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = json.loads(out.read_text())
    n = 20  # shared_records: 5 images x 4 records
    for epoch in (0, 1):
        shards = [[i for e, b in seen if e == epoch for i in b] for seen in per_rank]
        steps = [sum(e == epoch for e, _ in seen) for seen in per_rank]
        assert steps[0] == steps[1] == math.ceil(n / (2 * 3))
        assert sorted(shards[0] + shards[1]) == list(range(n))  # each record once, across the two ranks
        assert not set(shards[0]) & set(shards[1])
    (tmp_path / "check").mkdir()
    image = [r.inputs["image"] for r in shared_records(tmp_path / "check")]  # the same records, in the same order
    batches = [b for seen in per_rank for e, b in seen if e == 0]
    assert sum(len({image[i] for i in b}) for b in batches) <= 5 + len(batches) - 1  # grouped batches


def test_fewer_records_than_processes_is_one_line() -> None:
    from mmfuse.data.records import DataError

    with pytest.raises(DataError, match="1 training records cannot fill batches on 2 processes"):
        list(GroupedBatchSampler(torch.tensor([0]), 4, num_replicas=2, rank=0))
