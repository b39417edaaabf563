"""Writing and reading the files bridge_ops saves: atomic replacement, sha256 checksums, errors that name the file.

A file is written to a temporary name beside its destination, flushed to disk and renamed over it, so a reader (or a
run resumed after a crash) sees the old file or the new one, never a partial one. Files whose sha256 is recorded
(`bridge.safetensors` in `bridge_config.json`, `checkpoint.pt` in `checkpoint.json`) are verified before they are read.
"""

import hashlib
import json
import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` for a temporary path beside `path`, then renames the result over `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(path, write)


def read_json(path: str) -> dict:
    """The JSON object in `path`; a ValueError naming the file if it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"bridge_ops: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"bridge_ops: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str, expected: str, recorded_in: str) -> None:
    """Raises a ValueError naming `path` unless its sha256 is `expected` (as recorded in the file `recorded_in`)."""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"bridge_ops: {path} is corrupted or was replaced: its sha256 is {actual}, {recorded_in} "
            f"recorded {expected}"
        )


def ensure_writable_dir(path: str) -> None:
    """Creates directory `path` if needed and checks that files can be written in it (before hours of training)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".bridge_ops_write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"bridge_ops: cannot write to the output directory {path}: {e.strerror or e}") from None
