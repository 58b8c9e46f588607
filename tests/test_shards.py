"""Shard reading: rank/worker splitting, deterministic shuffle, and counted skipping of bad samples."""
import io
import json
import logging
from itertools import islice

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmcore.errors import UserError
from unified_mm.data.shards import ShardDataset, SkipLog, reader_plan, resolve_shards


def png_bytes(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def good(key: str, value: int = 7) -> dict:
    return {"__key__": key, "png": png_bytes(value), "json": json.dumps({"id": key}).encode()}


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def four_shards(tmp_path):
    return [write_shard(tmp_path / f"train-{s:05d}.tar", [good(f"s{s}-{i}") for i in range(5)]) for s in range(4)]


def keys(dataset):
    return [sample.key for sample in dataset]


def test_reads_all_in_order(four_shards, clean_env):
    dataset = ShardDataset(four_shards)
    assert keys(dataset) == [f"s{s}-{i}" for s in range(4) for i in range(5)]
    sample = next(iter(dataset))
    assert sample.image.mode == "RGB" and sample.meta == {"id": "s0-0"} and sample.shard == four_shards[0]


@pytest.mark.parametrize("num_shards", [4, 1])
def test_ranks_get_disjoint_covering_parts(tmp_path, clean_env, num_shards):
    shards = [write_shard(tmp_path / f"x-{s}.tar", [good(f"s{s}-{i}") for i in range(6)]) for s in range(num_shards)]
    parts = []
    for rank in range(2):
        clean_env.setenv("RANK", str(rank))
        clean_env.setenv("WORLD_SIZE", "2")
        parts.append(set(keys(ShardDataset(shards))))
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"s{s}-{i}" for s in range(num_shards) for i in range(6)}


def test_split_by_rank_false_reads_everything(four_shards, clean_env):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    assert len(keys(ShardDataset(four_shards))) == 10
    assert len(keys(ShardDataset(four_shards, split_by_rank=False))) == 20


def test_reader_plan():
    assert reader_plan(8, 3, 4) == (slice(3, None, 4), 0, 1)  # whole shards
    assert reader_plan(2, 3, 4) == (slice(None), 3, 4)  # every 4th sample of all shards


def test_shuffle_is_deterministic_and_epoch_dependent(four_shards, clean_env):
    first = keys(ShardDataset(four_shards, shuffle_buffer=8, seed=1))
    assert first == keys(ShardDataset(four_shards, shuffle_buffer=8, seed=1))
    assert sorted(first) == sorted(keys(ShardDataset(four_shards)))
    assert first != keys(ShardDataset(four_shards, shuffle_buffer=8, seed=1, epoch=1))
    assert first != keys(ShardDataset(four_shards))


def test_repeat_cycles_epochs(four_shards, clean_env):
    stream = keys(islice(iter(ShardDataset(four_shards[:1], repeat=True)), 12))
    assert stream[:5] == stream[5:10] and len(stream) == 12


def test_bad_samples_are_skipped_counted_and_named(tmp_path, clean_env, caplog):
    bad = [
        good("ok-0"),
        {"__key__": "not-image", "png": b"definitely not a png", "json": b"{}"},
        {"__key__": "bad-json", "png": png_bytes(1), "json": b"{not json"},
        {"__key__": "json-list", "png": png_bytes(1), "json": b"[1, 2]"},
        {"__key__": "no-json", "png": png_bytes(1)},
        {"__key__": "wrong-size", "png": png_bytes(1, size=9), "json": b"{}"},
        {"__key__": "bad-utf8", "png": png_bytes(1), "json": b"\xff\xfe{}"},
        good("ok-1"),
    ]
    shard = write_shard(tmp_path / "mixed.tar", bad)
    full = write_shard(tmp_path / "full.tar", [good(f"t-{i}", value=i) for i in range(40)])
    data = open(full, "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    skip_log = SkipLog()
    with caplog.at_level(logging.WARNING):
        got = keys(ShardDataset([shard, str(truncated)], image_size=8, skip_log=skip_log))
    assert got[:2] == ["ok-0", "ok-1"]
    assert 0 < len(got) - 2 < 40  # the readable head of the truncated shard survives
    assert set(got[2:]) <= {f"t-{i}" for i in range(40)}
    counts = skip_log.summary()
    assert counts["unreadable image"] == 1
    assert counts["bad json"] == 3
    assert counts["missing part"] == 2  # no-json, and the sample the cut split in two
    assert counts["wrong image size"] == 1
    assert counts["truncated tar"] == 1
    text = caplog.text
    for key in ("not-image", "bad-json", "no-json", "wrong-size"):
        assert f"{shard} key {key}" in text
    assert "truncated.tar" in text


def test_missing_shard_during_run_is_counted(tmp_path, clean_env):
    shard = write_shard(tmp_path / "a.tar", [good("a")])
    skip_log = SkipLog()
    got = keys(ShardDataset([shard, str(tmp_path / "vanished.tar")], skip_log=skip_log))
    assert got == ["a"] and skip_log.summary() == {"unreadable tar": 1}


def test_resolve_shards(four_shards, tmp_path):
    assert resolve_shards(tmp_path, "train") == four_shards
    assert resolve_shards(str(tmp_path / "train-{00000..00001}.tar")) == four_shards[:2]
    with pytest.raises(UserError, match="no shards matching 'val-\\*.tar'"):
        resolve_shards(tmp_path, "val")
    with pytest.raises(UserError, match="not found"):
        resolve_shards(tmp_path / "nothing-here")
    with pytest.raises(UserError, match="train-00004.tar"):
        resolve_shards(str(tmp_path / "train-{00000..00009}.tar"))
