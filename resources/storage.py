"""The store: a local folder by default. Everything is written atomically (temp file, then rename), so a reader
never sees half a file and a failed run leaves the previous version in place."""

import fcntl
import functools
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field


DEFAULT_ROOT = ".automl_store"


@functools.lru_cache(maxsize=64)
def _resolved(root: str, cwd: str) -> Path:
    """The absolute store folder for a configured root as seen from `cwd`: resolving walks every path component, and
    a run asks for thousands of store paths (one per hour file)."""
    return Path(cwd, Path(root).expanduser()).resolve()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on the file `path` (created if missing) against other threads and processes of this
    machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class LocalStorage(dg.ConfigurableResource):
    """The store in a local directory (`root`, relative paths are taken from the working directory)."""

    root: str = Field(
        default="",
        description="Folder that holds the event lake and every artefact; empty means $AUTOML_STORAGE_ROOT, else "
        f"./{DEFAULT_ROOT}. Resolved when used, so a process that sets the variable later still gets it.",
    )

    @property
    def base(self) -> Path:
        return _resolved(self.root or os.environ.get("AUTOML_STORAGE_ROOT") or DEFAULT_ROOT, os.getcwd())

    def path(self, *parts: str) -> str:
        """Absolute path of a stored object, in the form Spark, pyarrow and pandas all accept."""
        return str(self.base.joinpath(*parts))

    def exists(self, *parts: str) -> bool:
        return self.base.joinpath(*parts).exists()

    def modified_at(self, *parts: str) -> datetime:
        """When the stored file was last written (UTC)."""
        return datetime.fromtimestamp(self.base.joinpath(*parts).stat().st_mtime, timezone.utc)

    def list_dir(self, *parts: str) -> list[str]:
        folder = self.base.joinpath(*parts)
        return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith(".")) if folder.is_dir() else []

    @contextmanager
    def temp_dir(self) -> Iterator[Path]:
        """A scratch folder inside the store, on the same file system, so that results can be renamed into place."""
        folder = self.base / ".tmp" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def exclusive(self, *parts: str) -> Iterator[None]:
        """Holds a lock on a stored object against other threads and processes of this machine, for a
        read-modify-write (an atomic write alone would let two writers each drop the other's update)."""
        target = self.base.joinpath(*parts)
        with file_lock(target.with_name(f".{target.name}.lock")):
            yield

    def _atomic_target(self, parts: tuple[str, ...]) -> tuple[Path, Path]:
        target = self.base.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target, target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")

    def write_table(self, table: pa.Table, *parts: str) -> None:
        target, temp = self._atomic_target(parts)
        pq.write_table(table, temp, compression="zstd")
        os.replace(temp, target)

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        path = self.base.joinpath(*parts)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist in the store; materialise the asset that writes it first.")
        return pq.read_table(path, columns=columns)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target, temp = self._atomic_target(parts)
        temp.write_bytes(data)
        os.replace(temp, target)

    def read_bytes(self, *parts: str) -> bytes:
        return self.base.joinpath(*parts).read_bytes()

    def write_json(self, data: object, *parts: str) -> None:
        self.write_bytes(json.dumps(data, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> object:
        return json.loads(self.read_bytes(*parts))

    def copy(self, source: tuple[str, ...], target: tuple[str, ...]) -> None:
        """Copy a stored file to another place in the store: a hard link where the file system allows (stored files
        are never changed in place, only replaced), else a byte copy."""
        destination, temp = self._atomic_target(target)
        try:
            os.link(self.base.joinpath(*source), temp)
        except OSError:
            shutil.copyfile(self.base.joinpath(*source), temp)
        os.replace(temp, destination)

    def install(self, source: Path, *parts: str) -> None:
        """Replace the file or folder at `parts` by `source` (made in `temp_dir`), swapping by rename."""
        target = self.base.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        if target.is_dir():
            os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired, ignore_errors=True)

    def remove(self, *parts: str) -> None:
        path = self.base.joinpath(*parts)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
