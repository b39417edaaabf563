"""Writing and reading the files bridge_ops saves: one commit point per save, sha256 checksums, errors naming the file.

A save of several files that belong together (`save_bridge`'s weights and config, a training checkpoint and its
manifest, the CLI's model, tokenizer and Bridge) is published with `publish`: its files are written into a fresh
staging directory inside the destination and flushed to disk, and one atomic rename of that directory is the commit
point. Before it, the destination holds the previous save; after it, the new one: the renamed directory is a redo
record whose files are moved over their namesakes right away, and every loader first completes a record that a killed
writer left (`recover`). Writers of one directory take turns (an exclusive `flock` on it), so concurrent saves give
the last complete one, never an error or a mix. Files whose sha256 is recorded (`bridge.safetensors` and the config
itself in `bridge_config.json`, `checkpoint.pt` in `checkpoint.json`) are verified before they are read.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Sequence

STAGING = ".bridge_ops-staging-"  # a save being written (removed by the next writer if its writer was killed)
COMMIT = ".bridge_ops-commit-"  # a committed save whose files are being moved into place (the redo record)
REMOVALS = ".bridge_ops-removals.json"  # inside a commit: the names of the previous save it deletes


def publish(directory: str, write: Callable[[str], None], replaces: Sequence[str] = ()) -> None:
    """Publishes the files `write(staging)` writes into a fresh directory as one save into `directory` (created if
    needed): a kill at any instant leaves the previous save or this one, whole. Names in `replaces` that this save does
    not write are deleted at its commit (files of a previous save that would not belong with this one). Files only:
    `write` must not create subdirectories."""
    os.makedirs(directory, exist_ok=True)
    with _locked(directory):
        _finish(directory)
        staging = tempfile.mkdtemp(prefix=STAGING, dir=directory)
        try:
            write(staging)
            names = os.listdir(staging)
            removals = [name for name in replaces if name not in names]
            if removals:
                write_json(os.path.join(staging, REMOVALS), {"remove": removals})
            for name in os.listdir(staging):
                _fsync(os.path.join(staging, name))
            _fsync(staging)
            os.rename(staging, os.path.join(directory, COMMIT + os.path.basename(staging)[len(STAGING) :]))
            _fsync(directory)  # the commit point is on disk
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # nothing left after the rename
        _finish(directory)


def recover(directory: str) -> None:
    """Completes a save that a killed writer committed but did not finish moving into place, and removes what killed
    writers left half-written; every loader calls it before it reads `directory` (waiting for a save in progress)."""
    if os.path.isdir(directory) and any(entry.startswith((STAGING, COMMIT)) for entry in os.listdir(directory)):
        with _locked(directory):
            _finish(directory)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Holds an exclusive lock on `directory` (released when the process dies, so a killed writer never blocks)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _finish(directory: str) -> None:
    """With the lock held: moves the files of a committed save into place (again, if a kill interrupted it: moving is
    idempotent) and deletes staging directories (their writers were killed: a live writer holds the lock)."""
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if entry.startswith(STAGING):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(COMMIT):
            removals = os.path.join(path, REMOVALS)
            gone = read_json(removals)["remove"] if os.path.exists(removals) else []
            for name in os.listdir(path):
                if name != REMOVALS:
                    os.replace(os.path.join(path, name), os.path.join(directory, name))
            for name in gone:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, name))
            _fsync(directory)
            with contextlib.suppress(FileNotFoundError):
                os.remove(removals)
            os.rmdir(path)


def _fsync(path: str) -> None:
    """Flushes a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` for a temporary path beside `path` (unique to this call), then renames it over `path`: a
    reader sees the old file or the new one (one file; a save of several files uses `publish`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


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


def check_fields(data: dict, path: str, **types) -> None:
    """Raises a ValueError naming the file and the field unless every field present in `data` has its type in
    `types` (a type or a tuple of types, as for isinstance; bools are not integers)."""
    for name, kinds in types.items():
        value = data.get(name)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if name in data and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"bridge_ops: {path}: {name} must be {expected}, got {value!r}")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(data) -> str:
    """The sha256 of a JSON value's canonical text (keys sorted, no spaces): the same before and after a round trip
    through a file. numpy and torch values count as the lists and numbers they hold."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=_as_json)
    return hashlib.sha256(text.encode()).hexdigest()


def _as_json(value):
    return value.tolist() if hasattr(value, "tolist") else repr(value)


def self_digest(data: dict, name: str) -> str:
    """The sha256 that the JSON file `name` holding `data` records of itself, as data["sha256"][name]: the digest of
    `data` without that one entry."""
    return json_digest(dict(data, sha256={k: v for k, v in data["sha256"].items() if k != name}))


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
