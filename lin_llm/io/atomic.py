"""Atomic output: a file or directory appears complete or not at all, never half-written, and
nothing lin_llm did not write is ever replaced.

A directory written by ``atomic_directory`` carries a marker file listing what it wrote; only
such a directory (or a lin_llm checkpoint from before the marker) may be replaced, and only
with ``overwrite``. Work in progress lives in a hidden sibling ``.OUT.partial-PID@HOST-XXXX``:
one a killed run left behind is removed by the next run on that host, others are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from lin_llm.errors import CheckpointError

MARKER = ".lin_llm-output.json"


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False, sources: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; it becomes ``out`` only if the block succeeds.

    A crash or an error leaves ``out`` as it was (absent, or the previous complete version).
    Refused before anything is written: an ``out`` that is one of ``sources`` (what is being
    read) or contains one, an existing non-empty ``out`` without ``overwrite``, and with
    ``overwrite`` one that lin_llm did not write or that holds files it did not write.
    """
    out = Path(out).absolute()  # orbax requires absolute paths
    _refuse_sources(out, sources)
    _check_replaceable(out, overwrite)
    clean_leftovers(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "partial"), dir=out.parent))
    except OSError as err:
        raise CheckpointError(
            f"cannot write the output {out}: {err.strerror or err}; choose a directory you can write to"
        ) from None
    try:
        yield tmp
        entries = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"written_by": "lin_llm", "entries": entries}, indent=1))
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "old"), dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _refuse_sources(out: Path, sources: Sequence[str | Path]) -> None:
    resolved = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            what = "is" if source == resolved else "contains"
            raise CheckpointError(
                f"the output {out} {what} the input {source}: writing it would replace what is being read. "
                "Choose an output directory outside the input"
            )


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or out.is_symlink():
        raise CheckpointError(f"the output {out} exists and is not a directory; choose another output")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; choose another output or pass --overwrite")
    foreign = sorted(entries - _written_entries(out))
    if foreign:
        raise CheckpointError(
            f"{out} holds {foreign[0]!r}" + (f" ({len(foreign)} entries in all)" if len(foreign) > 1 else "")
            + ", which lin_llm did not write, so "
            "--overwrite does not replace it (it only replaces a previous lin_llm output). Choose another output, "
            "or move those files away yourself"
        )


def _written_entries(out: Path) -> set[str]:
    """What lin_llm wrote into ``out``: the marker's list; for a lin_llm checkpoint from before the
    marker, its config.yaml, params/ and tokenizer files; nothing for any other directory."""
    marker = out / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text()).get("entries", [])
        except (ValueError, AttributeError, OSError):
            return set()
        return {*map(str, listed), MARKER}
    entries = {p.name for p in out.iterdir()}
    legacy = (out / "params" / "_CHECKPOINT_METADATA").is_file() and (out / "config.yaml").is_file()
    if legacy and all(name in ("config.yaml", "params", "tokenizer.model") or name.endswith(".json") for name in entries):
        return entries
    return set()


# --------------------------------------------------------------------------- leftovers


def _work_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_leftovers(out: str | Path) -> list[Path]:
    """Remove the work directories of ``out`` that a killed run on this host left behind; report
    (on stderr) those it cannot tell are abandoned. Returns the ones removed."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(?:(\d+)@(.+)-)?[^-]*")
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        kind, pid, host = match.groups()
        ours = pid is not None and host == socket.gethostname() and not _alive(int(pid))
        if ours and not (kind == "old" and not out.exists()):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            print(f"note: removed {path}, left by an interrupted write of {out} (process {pid})", file=sys.stderr)
        elif kind == "old" and not out.exists():
            print(f"note: {path} holds the previous version of {out}, which an interrupted write removed; "
                  f"move {path / out.name} back to {out} to keep it", file=sys.stderr)
        else:
            owner = f"process {pid} on {host}" if pid else "an earlier lin_llm version"
            print(f"note: {path} is a partial write of {out} by {owner}; delete it if no such write is still "
                  "running", file=sys.stderr)
    return removed


def require_writable_directory(path: str | Path, what: str, error: type[Exception] = CheckpointError) -> Path:
    """``path`` as a directory this process can create files in (created if need be), else ``error``
    naming ``what`` (the flag or field it came from) and why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise error(
            f"{what}={str(path)!r} cannot be written ({err.strerror or type(err).__name__}: "
            f"{err.filename or path}); choose a directory you can create files in"
        ) from None
    return path


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
