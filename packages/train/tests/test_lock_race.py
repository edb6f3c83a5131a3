"""The run-folder lock under racing processes: of several processes that find one stale lock (or
no lock) at the same moment, exactly one takes it, every other is refused naming the holder, and
a killed holder's lock is free at once (the flock goes with the process)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moe_train import rundir

RACER = """
import json, sys, time
from pathlib import Path
from moe_train import rundir
from moe_train.errors import CLIError
from moe_train.rundir import RunLock

folder, go, done = (Path(a) for a in sys.argv[1:4])
slow = float(sys.argv[4])
if slow:
    # a slow read of the holder (a loaded machine): it widens the window between finding the
    # stale lock and taking it over, where a check-then-replace lock lets two processes in
    real_loads = json.loads
    rundir.json.loads = lambda text: (time.sleep(slow), real_loads(text))[1]
lock = RunLock(folder)
while not go.exists():
    time.sleep(0.001)
try:
    lock.acquire()
except CLIError as e:
    print("refused", e, flush=True)
    sys.exit(0)
print("got", flush=True)
while not done.exists():
    time.sleep(0.01)
lock.release()
"""


def stale_lock(folder: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = {"pid": gone.pid, "host": socket.gethostname()}
    (folder / rundir.LOCK).write_text(json.dumps(holder))


def race(tmp_path: Path, n: int, stale: bool, slow: float = 0.0) -> list[str]:
    folder, go, done = tmp_path / "run", tmp_path / "go", tmp_path / "done"
    folder.mkdir()
    if stale:
        stale_lock(folder)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(folder), str(go), str(done), str(slow)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    time.sleep(1.0)  # every racer imported and waiting
    go.touch()
    try:
        lines = [r.stdout.readline().strip() for r in racers]
    finally:
        done.touch()
        for r in racers:
            r.wait(timeout=60)
    return lines


@pytest.mark.parametrize("slow", [0.0, 0.05], ids=["fast", "slow reads"])
@pytest.mark.parametrize("stale", [True, False], ids=["stale lock", "no lock"])
@pytest.mark.parametrize("round_", range(2))
def test_racing_processes_one_takes_the_lock(tmp_path, stale, slow, round_):
    lines = race(tmp_path, 6, stale, slow)
    assert sum(line == "got" for line in lines) == 1, lines
    refused = [line for line in lines if line != "got"]
    assert all(
        line.startswith("refused") and ("in use" in line or "being locked" in line)
        for line in refused
    ), lines
    assert not (tmp_path / "run" / rundir.LOCK).exists()


def test_a_killed_holder_leaves_a_lock_the_next_run_takes(tmp_path):
    folder, go, done = tmp_path / "run", tmp_path / "go", tmp_path / "done"
    folder.mkdir()
    go.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", RACER, str(folder), str(go), str(done), "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "got"
    with pytest.raises(Exception, match="in use by a live run"):
        rundir.RunLock(folder).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = rundir.RunLock(folder)
    note = lock.acquire()
    assert note and "stale lock" in note and str(holder.pid) in note
    lock.release()
    assert not (folder / rundir.LOCK).exists()


PREPARING = """
import sys, time
import moe_data
from moe_train.cli import main

def slow_load(spec, **kwargs):
    # data preparation that takes long (a big corpus, a slow disk)
    while True:
        time.sleep(0.05)

moe_data.load = slow_load
sys.exit(main(["train", "--out", sys.argv[1], "--no-progress", "--no-tensorboard"]))
"""


def test_sigterm_ends_a_run_while_it_prepares_its_data(tmp_path):
    """The stop flag of the training loop is not installed yet: SIGTERM ends the process at once,
    and the lock it leaves is taken over by the next run (its flock went with the process)."""
    run = tmp_path / "run"
    preparing = subprocess.Popen([sys.executable, "-c", PREPARING, str(run)])
    deadline = time.monotonic() + 120
    while not (run / rundir.LOCK).exists():
        assert preparing.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    started = time.monotonic()
    preparing.send_signal(signal.SIGTERM)
    assert preparing.wait(timeout=10) == -signal.SIGTERM
    assert time.monotonic() - started < 10
    lock = rundir.RunLock(run)
    note = lock.acquire()
    assert note and "stale lock" in note
    lock.release()
