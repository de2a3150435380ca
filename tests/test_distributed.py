"""Recalibration across processes: torchrun with 2 gloo ranks on the CPU against one process on the same data.

The data has 257 samples, so the ranks' shares differ (batches of 32: 160 and 97 samples for `exact`,
whose 1-sample last batch stands alone, 128 and 129 for `fast`): an average of per-rank estimates would
be off, an exact merge is not. The job runs the CLI on every rank as `-m bnfold` would, then the library;
the failure tests launch `-m bnfold` itself. Each torchrun launch costs seconds (every process imports torch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnfold import load_model
from bnfold.data import DataOptions, open_data, share
from bnfold.distributed import World, _pack, _unpack, world
from bnfold.errors import UsageError
from bnfold.stats import ChannelStatistics
from tests.conftest import REPO, SAMPLES
from tests.distributed_job import CASES, recalibrated, stored_statistics

RELATIVE = 1e-6


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """257 digits: the shifted ones and one clean one."""
    data = np.concatenate([np.load(SAMPLES / "shifted_calib.npy"), np.load(SAMPLES / "calib.npy")[:1]])
    path = tmp_path_factory.mktemp("data") / "uneven.npy"
    np.save(path, data)
    return str(path)


def torchrun(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """2 processes on this machine; --standalone picks a free port."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def assert_close(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=RELATIVE, atol=0, err_msg=key)


@pytest.fixture(scope="module")
def alone(uneven) -> dict[str, np.ndarray]:
    """Every case of the job, recalibrated by this process alone."""
    return recalibrated(uneven, distributed=False)


@pytest.fixture(scope="module")
def job(uneven, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """tests/distributed_job.py under torchrun: the CLI, then every case through the library."""
    out = tmp_path_factory.mktemp("job")
    return torchrun("tests/distributed_job.py", uneven, str(out)), out


def test_under_torchrun_rank_0_alone_prints_and_writes_what_one_process_writes(job, alone):
    completed, out = job
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)  # one JSON document: rank 0 alone printed
    assert report["samples"] == 257 and report["output"] == str(out / "cli.pt2") and report["forward_passes"] > 1
    assert any("2 processes" in note for note in report["notes"])
    stored = stored_statistics(load_model(out / "cli.pt2"))
    written = {f"resnet.pt2-exact/{key}": value for key, value in stored.items()}
    assert_close({key: value for key, value in alone.items() if key in written}, written)
    assert len(written) > 6 and all(written[key] == 9 for key in written if key.endswith("/batches"))


def test_every_rank_ends_with_the_statistics_of_one_process(job, alone):
    completed, out = job
    assert completed.returncode == 0, completed.stderr
    ranks = [dict(np.load(out / f"rank{rank}.npz")) for rank in (0, 1)]
    # Every command ran its collectives on a group of its own and released it, never on the default
    # group (which modules torch imports keep alive): a gloo worker thread still holding a collective's
    # tensor when the interpreter shuts down aborts the process (SIGABRT at exit, in a few percent of
    # runs on a busy machine).
    assert [int(rank.pop("default_group_collectives")) for rank in ranks] == [0, 0]
    assert [int(rank.pop("leftover_gloo_threads")) for rank in ranks] == [0, 0]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(np.array_equal(ranks[0][key], ranks[1][key]) for key in ranks[0])  # bit-identical buffers
    assert_close(alone, ranks[0])
    assert {key.split("/")[0] for key in alone} == set(CASES)  # .pt2 and ONNX, exact and fast
    assert all(ranks[0][f"{case}/samples"] == 257 for case in CASES)


def test_a_failing_rank_fails_the_job_and_nothing_is_written(tmp_path):
    output = tmp_path / "out.pt2"
    completed = torchrun("-m", "bnfold", "recalibrate", str(SAMPLES / "cnn.pt2"),
                         "--data-fn", "tests.distributed_job:failing_shard", "-o", str(output), "--json")
    assert completed.returncode != 0
    assert "error: rank 1 of 2 failed: batches from failing_shard() raised OSError: shard 1 of the calibration " \
           "set is unreadable" in completed.stderr
    assert "error: batches from failing_shard() raised OSError" in completed.stderr  # rank 1's own line
    assert completed.stdout == "" and not output.exists() and list(tmp_path.iterdir()) == []


def test_an_error_every_rank_meets_is_printed_once(tmp_path):
    missing = tmp_path / "missing.npy"
    completed = torchrun("-m", "bnfold", "recalibrate", str(SAMPLES / "cnn.onnx"), "--data", str(missing),
                         "-o", str(tmp_path / "out.onnx"))
    assert completed.returncode != 0
    assert completed.stderr.count(f"error: no such data file or directory: {missing}") == 1  # by rank 0


def test_a_crashed_rank_ends_the_job_instead_of_hanging_it(tmp_path):
    output = tmp_path / "out.onnx"
    completed = torchrun("-m", "bnfold", "recalibrate", str(SAMPLES / "cnn.onnx"),
                         "--data-fn", "tests.distributed_job:crashing_shard", "-o", str(output), timeout=120)
    assert completed.returncode != 0 and "exitcode  : 9" in completed.stderr
    assert completed.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_rank_without_a_share_of_the_data_contributes_nothing(tmp_path):
    output = tmp_path / "out.onnx"
    data = SAMPLES / "shifted_calib.npy"
    completed = torchrun("-m", "bnfold", "recalibrate", str(SAMPLES / "cnn.onnx"), "--data", str(data),
                         "--max-samples", "32", "--batch-size", "32", "-o", str(output), "--json")
    assert completed.returncode == 0, completed.stderr  # one batch: rank 1 reads nothing
    from bnfold import recalibrate

    alone = recalibrate(SAMPLES / "cnn.onnx", data, max_samples=32, batch_size=32, distributed=False)
    assert_close(stored_statistics(alone.result), stored_statistics(load_model(output)))


def test_shares_are_contiguous_runs_of_the_batches_of_one_process(uneven):
    alone = [batch["input"] for batch in open_data(uneven, ["input"], DataOptions(batch_size=32)).batches()]
    shares = [[batch["input"] for batch in open_data(uneven, ["input"], DataOptions(
        batch_size=32, rank=rank, world_size=3)).batches()] for rank in range(3)]
    assert [len(batches) for batches in shares] == [3, 3, 3]
    assert all(np.array_equal(a, b) for a, b in zip(alone, sum(shares, []), strict=True))
    assert [share(10, rank, 4) for rank in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_a_data_function_is_told_its_rank_or_refused():
    calls = []

    def sharded(rank, world_size):
        calls.append((rank, world_size))
        return [np.ones((4, 3), np.float32)] * 5

    stream = open_data(sharded, ["x"], DataOptions(max_samples=9, rank=1, world_size=2))
    assert sum(len(batch["x"]) for batch in stream.batches()) == 4 and calls == [(1, 2)]  # 9 split 5 + 4
    with pytest.raises(UsageError, match="no rank= and world_size="):
        open_data(lambda: [], ["x"], DataOptions(rank=0, world_size=2))
    batches = [np.full((2, 3), i, np.float32) for i in range(5)]
    second = open_data(batches, ["x"], DataOptions(rank=1, world_size=2)).batches()
    assert [int(batch["x"][0, 0]) for batch in second] == [3, 4]


def test_one_process_is_a_world_of_one(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(3, 4, 1) and not world().root and world().device("cuda") == "cuda:1"
    alone = World()
    statistics = {"bn": ChannelStatistics()}
    assert alone.all_reduce_statistics(statistics, {"bn": 0}) is statistics
    assert alone.total(7) == 7 and alone.broadcast([["a"]]) == [["a"]] and alone.device("cuda") == "cuda"


def test_statistics_travel_exactly_and_merge_to_those_of_all_the_data():
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 3.0, size=(37, 4, 6))
    first, second, everything = ChannelStatistics(), ChannelStatistics(), ChannelStatistics()
    first.add_array(values[:30])
    second.add_array(values[30:])
    everything.add_array(values)
    channels = {"bn": 4, "unreached": 2}
    received = _unpack(_pack({"bn": second}, channels), channels)
    assert received.keys() == {"bn"}
    averaged = (first.mean + received["bn"].mean) / 2  # what averaging per-rank estimates would store
    assert not np.allclose(averaged, everything.mean, rtol=1e-2)
    first.merge(received["bn"])
    assert (first.count, first.samples, first.batches) == (everything.count, 37, 2)
    np.testing.assert_allclose(first.mean, everything.mean, rtol=1e-14)
    np.testing.assert_allclose(first.variance(1), everything.variance(1), rtol=1e-13)
    np.testing.assert_allclose(first.standard_error(), everything.standard_error(), rtol=1e-12)


def test_batch_unit_statistics_travel_as_such():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 3, 5))
    mine, theirs, everything = (ChannelStatistics(batch_units=True) for _ in range(3))
    for start in range(0, 40, 10):
        (mine if start < 20 else theirs).add_array(values[start:start + 10])
        everything.add_array(values[start:start + 10])
    received = _unpack(_pack({"bn": theirs}, {"bn": 3}), {"bn": 3})["bn"]
    assert received.batch_units and received.batches == 2
    mine.merge(received)
    np.testing.assert_allclose(mine.standard_error(), everything.standard_error(), rtol=1e-12)
