"""Files: atomic writes, reads that fail in one line, content digests, and the clean-up of killed writes.

Writes are atomic: a reader (or a kill -9) only ever sees the old file or the new one, never half of one. The
temporary file of a write carries this host and process in its name (``.NAME.mr2ft-tmp-HOST-PID-XXXX.tmp``), so a
later :func:`remove_stale_temp_files` can delete what a killed writer left behind. :func:`file_digest` hashes a
file's content once and remembers the hash by path, size, mtime, inode and ctime in a small side index, so a file
replaced by another of the same size and mtime (``cp -p``, ``rsync -a``, ``tar -x``) gets a new digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mr2ft.errors import UserError

log = logging.getLogger("mr2ft")

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_RE = re.compile(r"\.mr2ft-tmp-([0-9a-f]{8})-(\d+)-[^/]*\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.mr2ft-tmp-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (append of one short line; a torn last line is skipped on read)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()


def log_record(log_to: str | os.PathLike | Callable[[dict], None] | None, record: dict) -> None:
    """Send one metrics record where ``log_to`` says: a JSONL file (appended), a callable (e.g. one that also logs to
    experiment trackers, :mod:`mr2ft.tracking`) or nowhere (``None``)."""
    if log_to is None:
        return
    if callable(log_to):
        log_to(record)
    else:
        append_jsonl(log_to, record)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, skipping a torn last line left by a kill."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Save a dict of tensors as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU.

    Raises:
        UserError: the file exists but may not be read (safetensors itself calls that "No such file").
    """
    _refuse_unreadable(Path(path))
    return load_file(str(path), device="cpu")


def _refuse_unreadable(path: Path, what: str = "file") -> None:
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UserError(
            f"cannot read the {what} {path}: permission denied; give this user read access (chmod u+r, or run as "
            "its owner)"
        ) from None
    except (FileNotFoundError, IsADirectoryError):
        pass  # the caller says what a missing file or a folder means


def readable_file(path: str | os.PathLike, what: str, hint: str) -> Path:
    """``path`` if it is a file this user may read; else one line saying which of missing / folder / no permission.

    Args:
        what: what the file is, for the message (``"weights file"``).
        hint: how to fix it, ending the message (``"pass an existing file with --weights"``).
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist; {hint}") from None
    except PermissionError:
        raise UserError(f"{what} {p} cannot be reached: permission denied on a folder above it; {hint}") from None
    except OSError as e:
        raise UserError(f"{what} {p} cannot be used ({e.strerror}); {hint}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{p} is a folder, not a {what}; pass the file inside it")
    _refuse_unreadable(p, what)
    return p


# ---- content digests ------------------------------------------------------------------------------------------

_DIGEST_INDEX_SIZE = 2000


def digest_index_path() -> Path:
    """The side index of file digests: ``$MR2FT_DIGEST_INDEX``, else ``$XDG_CACHE_HOME/mr2ft/file-digests.json``."""
    if os.environ.get("MR2FT_DIGEST_INDEX"):
        return Path(os.environ["MR2FT_DIGEST_INDEX"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mr2ft" / "file-digests.json"


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content (hex), read once and then remembered by (path, size, mtime, inode, ctime).

    ctime cannot be set back by a user and a replaced file gets a new inode, so a stored digest is reused only for
    the very same file content-wise; the index is a cache: when it cannot be read or written, the file is hashed.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev]
    index_path = digest_index_path()
    try:
        index = read_json(index_path) if index_path.is_file() else {}
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    entry = index.get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    index.pop(real, None)
    index[real] = {"stamp": stamp, "sha256": digest}
    while len(index) > _DIGEST_INDEX_SIZE:
        index.pop(next(iter(index)))
    try:
        write_json(index_path, index)
    except OSError as e:
        log.debug("cannot update the digest index %s (%s); files will be hashed again", index_path, e)
    return digest


# ---- temporary files left by killed writers -------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, max_age_s: float = 3600.0, depth: int = 2) -> int:
    """Delete the temporary files of :func:`atomic_path` writes that were killed, in ``folder`` (``depth`` levels).

    A file is stale when its writer ran on this host and is gone, or when it is older than ``max_age_s`` seconds
    (a writer on another host sharing the folder). Returns how many were removed.
    """
    removed = 0
    now = time.time()
    pattern = "/".join(["*"] * (depth - 1) + [".*.tmp"]) if depth > 1 else ".*.tmp"
    for candidate in [*Path(folder).glob(".*.tmp"), *(Path(folder).glob(pattern) if depth > 1 else [])]:
        match = _TEMP_RE.search(candidate.name)
        if match is None:
            continue
        host, pid = match.group(1), int(match.group(2))
        try:
            dead = host == _HOST and pid != os.getpid() and not _pid_alive(pid)
            if dead or now - candidate.stat().st_mtime > max_age_s:
                candidate.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def state_checksum(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, to prove a frozen backbone stayed frozen."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
