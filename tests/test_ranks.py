"""The ranks' side of a data-parallel training, and relaying rank 0's events (no process started
here: tests/test_distributed.py starts real ranks)."""

import threading
import time

import pytest
import torch

from flows.config import BatchSplitError, check_batch
from models import ModelSpec
from tasks.data.datasets import DatasetRef
from tasks.train.launch import DevicesError, RanksFailedError, relay, resolve_devices
from tasks.train.ranks import FileChannel, RankJob, Reporter, StopRequested
from tasks.train.speed import Levers
from tasks.train.training import TrainSettings


def job() -> RankJob:
    dataset = DatasetRef(
        "digits", "/data/p.safetensors", "ab" * 32, ("0", "1"), 1, (8, 8), 10, 4, (0.5,), (0.2,), "a", "b"
    )
    spec = ModelSpec("cnn", 1, (8, 8), 2, (0.5,), (0.2,))
    return RankJob(
        spec, TrainSettings(2, "adamw", 1e-3, 0.0, "onecycle", 0), dataset, 64, 0.1, "none", "cpu", 1, 60
    )


def test_a_rank_job_travels_as_json_and_comes_back_equal():
    assert RankJob.from_json(job().to_json()) == job()


def test_the_file_channel_hands_over_whole_lines_once(tmp_path):
    channel = FileChannel(tmp_path)
    assert channel.receive() == []
    channel.send({"kind": "epoch", "epoch": 1})
    with open(tmp_path / "events.jsonl", "a") as out:
        out.write('{"kind": "ba')  # a line rank 0 is still writing
    assert channel.receive() == [{"kind": "epoch", "epoch": 1}]
    with open(tmp_path / "events.jsonl", "a") as out:
        out.write('tch"}\n')
    assert channel.receive() == [{"kind": "batch"}] and channel.receive() == []
    assert not channel.stop_requested()
    channel.request_stop()
    assert channel.stop_requested()


def test_rank_0_reports_progress_at_most_twice_a_second_and_stops_when_asked(tmp_path):
    channel = FileChannel(tmp_path)
    reporter = Reporter(channel)
    reporter.on_start(Levers("fp32", True, False))
    for batch in range(1, 100):
        reporter.on_batch(1, batch)
    reporter.on_epoch(1, {"val_accuracy": 0.5})
    events = channel.receive()
    assert [e["kind"] for e in events] == ["start", "batch", "epoch"]
    assert events[0]["tags"]["precision"] == "fp32" and events[0]["tags"]["channels_last"] == "true"
    channel.request_stop()
    reporter.reported = 0.0
    with pytest.raises(StopRequested):
        reporter.on_batch(2, 1)


def test_batch_sizes_that_do_not_divide_are_refused_naming_the_nearest_that_do():
    check_batch(128, 4)
    with pytest.raises(BatchSplitError, match="130 does not divide over --devices 4.*128 or 132"):
        check_batch(130, 4)
    with pytest.raises(BatchSplitError, match="that do: 3$"):
        check_batch(2, 3)


def test_devices_are_checked_against_the_machine():
    cpu = torch.device("cpu")
    assert resolve_devices("auto", cpu) == 1 and resolve_devices("1", cpu) == 1
    with pytest.raises(DevicesError, match="--devices 100000 asks for more processes than this machine's"):
        resolve_devices("100000", cpu)


def test_relay_hands_every_event_over_and_stops_the_ranks_when_a_handler_fails():
    sent, handled, stopped = [], [], threading.Event()

    def ranks() -> None:  # rank 0 reports until asked to stop, then fails as it does
        for step in range(200):
            sent.append({"step": step})
            if stopped.wait(0.01):
                raise RuntimeError("stopped")

    def receive() -> list:
        taken = sent[:]
        del sent[: len(taken)]
        return taken

    def handle(event: dict) -> None:
        handled.append(event["step"])
        if event["step"] == 5:
            raise ValueError("cancelled")

    with pytest.raises(ValueError, match="cancelled"):  # the handler's error, not the ranks'
        relay(ranks, receive, handle, stopped.set)
    assert handled[:6] == list(range(6)) and stopped.is_set()

    handled.clear()
    relay(lambda: sent.extend({"step": s} for s in range(3)), receive, handle, stopped.set)
    assert handled == [0, 1, 2]  # events sent just before the ranks ended are not lost

    def failing() -> None:
        time.sleep(0.05)
        raise OSError("rank 1 is gone")

    with pytest.raises(RanksFailedError, match="rank 1 is gone"):
        relay(failing, receive, handle, stopped.set)
