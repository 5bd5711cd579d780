"""The sweep store: one JSON header line, then one self-contained JSON line per finished run.

Single writer: the process that runs `ufm.sweep` holds an exclusive ``flock`` on the file while it runs and
appends each chunk's records in one ``write`` + ``fsync`` (Ctrl-C is held during the write). Dask workers never
touch the store; their records come back to the client, which appends them.

Integrity. Each record carries ``"sha256"``: the first 16 hex digits of
sha256(store_id + canonical JSON of the record without that field), where ``store_id`` is a random id in the
header. A record whose content was edited, or a record copied from another store, fails it. When reading,
a line that is not JSON, not a record, fails its checksum or repeats a run is *bad*: it is reported by line
number (`StoreIntegrityWarning`, or ValueError with ``strict=True``) and skipped, so the other records load and
a resumed sweep recomputes the skipped runs. A final line without its newline is a write cut short by a killed
process: it is dropped silently (resume truncates it and redoes its chunk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import tempfile
import threading
import warnings
from collections.abc import Mapping
from typing import NamedTuple

SCHEMA = 2
"""Version of the store layout; a store with another schema is refused (1: no checksums)."""


class IncompatibleStoreError(ValueError):
    """The store was written by a different sweep (grid, settings or versions), or is in use by another running
    sweep; it is never mixed."""


class StoreIntegrityWarning(UserWarning):
    """Lines of a sweep store were unreadable or failed their checksum; they were skipped (see `ufm.load_sweep`)."""


def new_header(fingerprint: Mapping, grid, created: str) -> dict:
    """The header line of a new store (``store_id`` is random: it salts the record checksums)."""
    return {
        "ufm_sweep": SCHEMA,
        "store_id": secrets.token_hex(8),
        "fingerprint": dict(fingerprint),
        "grid": grid,
        "created": created,
    }


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def checksum(record: Mapping, store_id: str) -> str:
    """sha256(store_id + canonical JSON of ``record`` without ``"sha256"``), first 16 hex digits."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(store_id.encode() + b"\n" + _canonical(body)).hexdigest()[:16]


def seal(record: Mapping, store_id: str) -> dict:
    """The record with its checksum field."""
    return {**record, "sha256": checksum(record, store_id)}


class StoreContents(NamedTuple):
    """A parsed store: ``header``; ``records`` (valid ones, file order); ``bad`` ((line number, reason) for each
    skipped line); ``end`` (bytes up to the last newline) and ``torn`` (bytes after it: a cut-short write)."""

    header: dict
    records: list
    bad: list
    end: int
    torn: int


def read_store(path: str) -> StoreContents:
    """Parse a store (see the module docstring for what counts as bad). Raises ValueError if the file is not a
    readable ufm sweep store at all (no valid header)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ValueError(f"sweep store {path!r} is a folder, not a store file") from None
    except PermissionError:
        raise ValueError(f"sweep store {path!r} is not readable (permission denied)") from None
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1] if end else []
    header = None
    if lines:
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict) or header.get("ufm_sweep") is None:
        raise ValueError(f"{path!r} is not a ufm sweep store (its first line is not a ufm_sweep header)")
    store_id = str(header.get("store_id", ""))
    records: list[dict] = []
    bad: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], 2):
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append((lineno, f"not JSON ({e})"))
            continue
        if not isinstance(r, dict) or "run" not in r or "index" not in r:
            bad.append((lineno, "not a run record"))
        elif r.get("sha256") != checksum(r, store_id):
            bad.append((lineno, f"checksum mismatch (run {r.get('run')}: edited, or copied from another store)"))
        elif r["run"] in seen:
            bad.append((lineno, f"run {r['run']} again (first on line {seen[r['run']]})"))
        else:
            seen[r["run"]] = lineno
            records.append(r)
    return StoreContents(header, records, bad, end, len(data) - end)


def report_bad(path: str, bad: list, strict: bool) -> None:
    """Warn (or raise ValueError when ``strict``) naming the bad lines of a store."""
    if not bad:
        return
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    msg = f"sweep store {path!r} has {len(bad)} bad line(s), skipped: {shown}"
    if strict:
        raise ValueError(msg)
    warnings.warn(msg + ". A resumed sweep recomputes their runs.", StoreIntegrityWarning, stacklevel=3)


def compare(path: str, old: Mapping, new: Mapping) -> None:
    """Raise `IncompatibleStoreError` listing every difference between a store's header and this sweep's
    fingerprint (schema, grid, settings, versions)."""
    diffs = []
    if old.get("ufm_sweep") != SCHEMA:
        diffs.append(f"store schema {old.get('ufm_sweep')} != {SCHEMA}")
    fp = old.get("fingerprint", {})
    if fp.get("n_runs") != new["n_runs"] or fp.get("runs_sha256") != new["runs_sha256"]:
        diffs.append(
            f"the grid differs (store: {fp.get('n_runs')} runs, this sweep: {new['n_runs']} runs, "
            "or the same count with other configs)"
        )
    for k in sorted(set(fp.get("settings", {})) | set(new["settings"])):
        a, b = fp.get("settings", {}).get(k), new["settings"].get(k)
        if a != b:
            diffs.append(f"setting {k}: store {a!r}, this sweep {b!r}")
    for k in sorted(set(fp.get("versions", {})) | set(new["versions"])):
        a, b = fp.get("versions", {}).get(k), new["versions"].get(k)
        if a != b:
            diffs.append(f"{k} version: store {a}, now {b}")
    if diffs:
        raise IncompatibleStoreError(
            f"sweep store {path!r} was written by an incompatible sweep and will not be mixed: "
            + "; ".join(diffs)
            + ". Use a new store path (or delete this one to start over)."
        )


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C while a chunk's records are written, so a write is never cut by KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


class Store:
    """Append-only JSON-lines store with an exclusive lock; each chunk is one write() + fsync.

    Opening creates the store (header only) if it does not exist, or reads an existing one under the lock and
    refuses it unless it was written by the same sweep (`compare`). ``done`` maps run id -> record."""

    def __init__(self, path: str, header: dict):
        self.path = os.fspath(path)
        self.fd = None
        if os.path.isdir(self.path):
            raise ValueError(
                f"sweep store {self.path!r} is a folder; give a file path such as "
                f"{os.path.join(self.path, 'sweep.jsonl')!r}"
            )
        try:
            if not os.path.exists(self.path):
                self._create(header)
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except PermissionError as e:
            raise ValueError(f"sweep store {self.path!r} cannot be written (permission denied: {e.filename})") from None
        except OSError as e:
            raise ValueError(f"sweep store {self.path!r} cannot be opened for writing: {e.strerror}") from None
        try:
            try:
                import fcntl

                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - non-POSIX: no lock
                pass
            except OSError:
                raise IncompatibleStoreError(f"sweep store {self.path!r} is locked by another running sweep") from None
            contents = read_store(self.path)  # read under the lock
            compare(self.path, contents.header, header["fingerprint"])
            report_bad(self.path, contents.bad, strict=False)
        except BaseException:
            self.close()
            raise
        self.header = contents.header
        self.store_id = str(self.header["store_id"])
        self.done = {r["run"]: r for r in contents.records}
        if contents.torn:
            os.ftruncate(self.fd, contents.end)  # drop a line cut short by a killed process; its run is redone

    def _create(self, header: dict) -> None:
        """Write the header to a fresh temporary file (``mkstemp``: O_CREAT|O_EXCL, a random name, so a planted
        file or symlink is never followed) and hard-link it into place: the store exists complete or not at all,
        and an existing path (another sweep's store, a symlink) is never overwritten."""
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                f.write(_canonical(header) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # fails if the path exists (another sweep's store, a planted symlink)
            except FileExistsError:
                pass
            except OSError:  # pragma: no cover - file systems without hard links: an atomic rename instead
                if not os.path.lexists(self.path):
                    os.replace(tmp, self.path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def append(self, records: list[dict]) -> list[dict]:
        """Seal (checksum) and append records in one write; returns the sealed records."""
        sealed = [seal(r, self.store_id) for r in records]
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in sealed)
        if self.fd is None:
            raise ValueError(f"sweep store {self.path!r} is closed")
        fd = self.fd
        with defer_sigint():
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        return sealed

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
