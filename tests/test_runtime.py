"""The runtime helpers every component writes through: atomic writes and the file lock."""

import os
import threading
import time

from rearlib.runtime import atomic_write_text, file_lock


def test_atomic_writes_get_the_usual_permissions_not_a_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.md", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_file_lock_serialises_holders(tmp_path):
    lock = tmp_path / "x.lock"
    events = []

    def hold(name):
        with file_lock(lock):
            events.append(f"{name} in")
            time.sleep(0.05)
            events.append(f"{name} out")

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events[0][0] == events[1][0] and events[2][0] == events[3][0]  # never interleaved
