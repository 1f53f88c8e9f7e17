"""The persistent tuning database: best schedules per (workload, target), shared by every build.

Layout of a database directory (default ``$DETC_CACHE_DIR/tuning``, or ``--tuning-db PATH``)::

    workloads.jsonl   {"workload": <structural hash>, "json": <MetaSchedule Workload JSON>}
    records.jsonl     {"workload": <hash>, "target": <target key>, "record": <TuningRecord JSON>,
                       "run_s": <best measured seconds>}
    .lock             flock(2) lock file

Records are keyed by the workload's structural hash (stable across processes and models: two
models with the same convolution share its schedule) and by a *target key* naming the CPU, core
count and code-generation options, so a schedule measured on one machine never serves another.

Concurrency and interruption: appends happen under an exclusive ``flock`` in one ``write`` per
batch, readers take a shared lock, and a line that does not parse (a write cut short by a crash)
is skipped, so two builds may tune into one database at once and Ctrl-C never corrupts it.
:meth:`TuningDatabase.compact` rewrites the files (atomically, with detc.compiler.fileio) keeping
the best few records per workload and target.

Export / import: :meth:`TuningDatabase.export_to` writes a self-contained single JSON file of the
records for some workloads (or all; gzip-compressed when the name ends in ``.gz``),
:func:`import_records` merges such a file or another database directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import cache_dir, write_bytes_atomically

WORKLOADS_FILE = "workloads.jsonl"
RECORDS_FILE = "records.jsonl"
#: the measured int8 kernel tiles (``detc.targets.tuning.tiles``): one JSON line per measurement
INT8_TILES_FILE = "int8_tiles.jsonl"
LOCK_FILE = ".lock"
EXPORT_FORMAT = "detc-tuning-db"
EXPORT_VERSION = 1
GZIP_MAGIC = b"\x1f\x8b"
#: records kept per (workload, target) when compacting
KEEP_PER_WORKLOAD = 8


def default_database_dir() -> Path:
    return cache_dir() / "tuning"


def target_key(target_json: dict[str, Any]) -> str:
    """A short stable name for a TVM target JSON: ``llvm-emeraldrapids-2c-1a2b3c4d``."""
    canonical = json.dumps(target_json, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    kind = str(target_json.get("kind", "target"))
    cpu = str(target_json.get("mcpu") or target_json.get("mtriple") or "generic")
    cores = target_json.get("num-cores")
    return f"{kind}-{cpu}" + (f"-{cores}c" if cores else "") + f"-{digest}"


@dataclass(frozen=True)
class StoredRecord:
    workload: str  # structural hash
    target: str  # target key
    record: Any  # TuningRecord JSON (a list)
    run_s: float

    def as_line(self) -> str:
        entry = {"workload": self.workload, "target": self.target, "record": self.record}
        entry["run_s"] = self.run_s
        return json.dumps(entry, separators=(",", ":"))


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: every complete line is still usable
        if isinstance(entry, dict):
            yield entry


class TuningDatabase:
    """One database directory, seen for one target (``target_json``)."""

    def __init__(self, directory: Path, target_json: dict[str, Any]) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise BadInputError(
                f"tuning database {self.directory} is not a directory; give a directory to "
                "--tuning-db (an exported .json file is imported with --import-db)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.target_json = dict(target_json)
        self.target = target_key(self.target_json)
        self._workload_json: dict[str, Any] = {}
        self._records: dict[str, list[StoredRecord]] = {}
        self._memory: Any = None  # MetaSchedule MemoryDatabase, built on demand
        self._modules: dict[str, Any] = {}  # decoded workload IRModules
        self.reload()

    # ---- locking ------------------------------------------------------------------------------
    def _locked(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return locked(self.directory, exclusive)

    # ---- reading ------------------------------------------------------------------------------
    def reload(self) -> None:
        """Read both files again (records another process appended become visible)."""
        with self._locked(exclusive=False):
            workloads = {
                str(e["workload"]): e["json"]
                for e in _read_jsonl(self.directory / WORKLOADS_FILE)
                if "workload" in e and "json" in e
            }
            records: dict[str, list[StoredRecord]] = {}
            for entry in _read_jsonl(self.directory / RECORDS_FILE):
                stored = _stored(entry)
                if stored is None or stored.target != self.target:
                    continue
                if stored.workload in workloads:
                    records.setdefault(stored.workload, []).append(stored)
        for group in records.values():
            group.sort(key=lambda r: r.run_s)
        self._workload_json = workloads
        self._records = records
        self._memory = None

    def workloads_with_records(self) -> set[str]:
        return set(self._records)

    def best_seconds(self, workload: str) -> float | None:
        group = self._records.get(workload)
        return group[0].run_s if group else None

    def record_count(self, workload: str | None = None) -> int:
        if workload is not None:
            return len(self._records.get(workload, []))
        return sum(len(group) for group in self._records.values())

    def digest(self, workloads: Iterable[str]) -> str:
        """sha256 over the best record of each of ``workloads`` (the schedules a build used)."""
        digest = hashlib.sha256(self.target.encode())
        for workload in sorted(set(workloads)):
            group = self._records.get(workload)
            if group:
                digest.update(workload.encode())
                digest.update(json.dumps(group[0].record, sort_keys=True).encode())
        return digest.hexdigest()

    def memory_database(self) -> Any:
        """A MetaSchedule ``MemoryDatabase`` holding this target's records (built once)."""
        if self._memory is None:
            from tvm.s_tir import meta_schedule as ms

            memory = ms.database.MemoryDatabase(module_equality="structural")
            for workload_hash, group in self._records.items():
                workload = memory.commit_workload(self.workload_module(workload_hash))
                for stored in group:
                    try:
                        record = ms.database.TuningRecord.from_json(stored.record, workload)
                    except Exception:  # a record from another TVM version: skip, do not fail
                        continue
                    memory.commit_tuning_record(record)
            self._memory = memory
        return self._memory

    def workload_module(self, workload_hash: str) -> Any:
        """The IRModule of a stored workload (decoded once)."""
        module = self._modules.get(workload_hash)
        if module is None:
            from tvm.s_tir import meta_schedule as ms

            module = ms.database.Workload.from_json(self._workload_json[workload_hash]).mod
            self._modules[workload_hash] = module
        return module

    # ---- writing ------------------------------------------------------------------------------
    def add(
        self, workload_json: Any, records: list[tuple[Any, float]], workload_mod: Any = None
    ) -> None:
        """Append ``records`` (TuningRecord JSON, best seconds) of one workload, durably; also
        into the MemoryDatabase a running search reads (``workload_mod`` is its IRModule)."""
        workload_hash = str(workload_json[0])
        new_workload = workload_hash not in self._workload_json
        stored = [StoredRecord(workload_hash, self.target, rec, sec) for rec, sec in records]
        with self._locked(exclusive=True):
            if new_workload:
                line = json.dumps({"workload": workload_hash, "json": workload_json})
                append_lines(self.directory / WORKLOADS_FILE, line + "\n")
            if stored:
                append_lines(
                    self.directory / RECORDS_FILE, "".join(s.as_line() + "\n" for s in stored)
                )
        self._workload_json[workload_hash] = workload_json
        group = self._records.setdefault(workload_hash, [])
        group.extend(stored)
        group.sort(key=lambda r: r.run_s)
        if self._memory is not None:
            from tvm.s_tir import meta_schedule as ms

            if workload_mod is None:
                workload_mod = self.workload_module(workload_hash)
            workload = self._memory.commit_workload(workload_mod)
            for record_json, _ in records:
                self._memory.commit_tuning_record(
                    ms.database.TuningRecord.from_json(record_json, workload)
                )

    def compact(self, keep: int = KEEP_PER_WORKLOAD) -> None:
        """Rewrite the files keeping the ``keep`` best records per (workload, target)."""
        with self._locked(exclusive=True):
            workloads: dict[str, Any] = {}
            for entry in _read_jsonl(self.directory / WORKLOADS_FILE):
                if "workload" in entry and "json" in entry:
                    workloads.setdefault(str(entry["workload"]), entry["json"])
            groups: dict[tuple[str, str], list[StoredRecord]] = {}
            for entry in _read_jsonl(self.directory / RECORDS_FILE):
                stored = _stored(entry)
                if stored is not None and stored.workload in workloads:
                    groups.setdefault((stored.workload, stored.target), []).append(stored)
            kept: list[StoredRecord] = []
            for group in groups.values():
                group.sort(key=lambda r: r.run_s)
                kept.extend(_distinct(group)[:keep])
            used = {s.workload for s in kept}
            _replace(
                self.directory / WORKLOADS_FILE,
                "".join(
                    json.dumps({"workload": h, "json": j}) + "\n"
                    for h, j in workloads.items()
                    if h in used
                ),
            )
            _replace(self.directory / RECORDS_FILE, "".join(s.as_line() + "\n" for s in kept))
        self.reload()

    # ---- export / import ----------------------------------------------------------------------
    def export_to(
        self, path: Path, workloads: Iterable[str] | None = None, keep: int = KEEP_PER_WORKLOAD
    ) -> int:
        """Write this target's ``keep`` best records of each of ``workloads`` (default all) to
        one JSON file; returns how many records it holds."""
        chosen = set(self._records) if workloads is None else set(workloads) & set(self._records)
        records = [s for h in sorted(chosen) for s in _distinct(self._records[h])[:keep]]
        document = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "workloads": {h: self._workload_json[h] for h in sorted(chosen)},
            "records": [json.loads(s.as_line()) for s in records],
            "int8_tiles": list(_read_jsonl(self.directory / INT8_TILES_FILE)),
        }
        text = json.dumps(document) + "\n"
        if str(path).endswith(".gz"):  # the workloads' IR is verbose: ~15x smaller compressed
            write_bytes_atomically(Path(path), gzip.compress(text.encode("utf-8"), mtime=0))
        else:
            _replace(Path(path), text)
        return len(records)

    def import_from(self, source: Path) -> int:
        """Merge an exported file or another database directory (all targets); returns the
        number of records added."""
        added = import_records(self.directory, source)
        self.reload()
        return added


def import_records(directory: Path, source: Path) -> int:
    """Merge an exported file or a database directory ``source`` into the database directory
    ``directory`` (every target's records; each target later reads only its own). Records
    already present are not added again. Returns the number of records added."""
    source, directory = Path(source), Path(directory)
    if source.is_dir():
        workloads = {
            str(e["workload"]): e["json"]
            for e in _read_jsonl(source / WORKLOADS_FILE)
            if "workload" in e and "json" in e
        }
        entries = list(_read_jsonl(source / RECORDS_FILE))
        tiles = list(_read_jsonl(source / INT8_TILES_FILE))
    else:
        try:
            payload = source.read_bytes()
            if payload[:2] == GZIP_MAGIC:
                payload = gzip.decompress(payload)
            document = json.loads(payload.decode("utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"tuning database {source} does not exist") from None
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInputError(f"tuning database {source} is unreadable ({err})") from err
        if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
            raise BadInputError(
                f"{source} is not an exported detc tuning database (format {EXPORT_FORMAT})"
            )
        workloads = {str(k): v for k, v in document.get("workloads", {}).items()}
        entries = [e for e in document.get("records", []) if isinstance(e, dict)]
        tiles = [e for e in document.get("int8_tiles", []) if isinstance(e, dict)]
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory, exclusive=True):
        existing = {
            stored.as_line()
            for stored in map(_stored, _read_jsonl(directory / RECORDS_FILE))
            if stored is not None
        }
        added = [
            s
            for s in (_stored(e) for e in entries)
            if s is not None and s.workload in workloads and s.as_line() not in existing
        ]
        known = {str(e.get("workload")) for e in _read_jsonl(directory / WORKLOADS_FILE)}
        fresh = sorted({s.workload for s in added} - known)
        if fresh:
            append_lines(
                directory / WORKLOADS_FILE,
                "".join(json.dumps({"workload": h, "json": workloads[h]}) + "\n" for h in fresh),
            )
        if added:
            append_lines(directory / RECORDS_FILE, "".join(s.as_line() + "\n" for s in added))
        _merge_lines(directory / INT8_TILES_FILE, tiles)
    return len(added)


def _merge_lines(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append the JSON ``entries`` that ``path`` does not hold yet (the caller holds the lock)."""
    canonical = lambda entry: json.dumps(entry, sort_keys=True, separators=(",", ":"))  # noqa: E731
    present = {canonical(e) for e in _read_jsonl(path)}
    fresh = [canonical(e) for e in entries if canonical(e) not in present]
    if fresh:
        append_lines(path, "".join(line + "\n" for line in dict.fromkeys(fresh)))


@contextlib.contextmanager
def locked(directory: Path, exclusive: bool) -> Iterator[None]:
    """flock(2) on the database's lock file: exclusive to write, shared to read."""
    with (directory / LOCK_FILE).open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _stored(entry: dict[str, Any]) -> StoredRecord | None:
    try:
        return StoredRecord(
            str(entry["workload"]), str(entry["target"]), entry["record"], float(entry["run_s"])
        )
    except (KeyError, TypeError, ValueError):
        return None


def _distinct(group: list[StoredRecord]) -> list[StoredRecord]:
    """Drop repeated measurements of the same schedule (same trace), keeping the fastest."""
    seen: set[str] = set()
    unique = []
    for stored in group:
        key = json.dumps(stored.record[0] if stored.record else None, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(stored)
    return unique


def append_lines(path: Path, text: str) -> None:
    """One ``write`` (so concurrent readers see whole lines), then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))
