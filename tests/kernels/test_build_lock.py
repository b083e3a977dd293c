"""A kernel build lock left by a killed process must not block every later start."""

import os
import time

from gorgon.kernels.build import STALE_LOCK_SECONDS, _clear_stale_lock


def test_stale_lock_is_removed_fresh_lock_is_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running now
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    _clear_stale_lock(tmp_path)
    assert not lock.exists()
    _clear_stale_lock(tmp_path)  # no lock: nothing to do
