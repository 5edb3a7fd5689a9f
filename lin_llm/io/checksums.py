"""sha256 checksums of checkpoint arrays, written with a checkpoint and verified when it is restored.

Orbax 0.12 (tensorstore zarr3) checksums only the index of each shard file (crc32c), not the
chunk data, and exposes no option to add a data checksum: a byte overwritten inside a params
chunk restores without complaint. So each array's bytes (C order, its stored dtype) get a sha256,
computed from the arrays being saved and checked against the arrays restored. A model checkpoint
keeps them in checksums.json inside its (atomically written) directory; a training checkpoint in
its meta item, committed with the step. Arrays spread over several hosts are gathered one at a
time to compute their digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from lin_llm.errors import CheckpointError

FILE = "checksums.json"


def host_array(value) -> np.ndarray:
    """``value`` as one host array (a jax array spread over hosts is gathered: every process calls)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def digest(value) -> str:
    """sha256 of the array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(host_array(value)).view(np.uint8).data).hexdigest()


def _key(entry) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaves(tree) -> dict[str, object]:
    """The arrays of a pytree by path ("params/layers.0.attn.wq.kernel", "opt/1/0/mu/embed.embedding", ...)."""
    return {"/".join(_key(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def digests(flat: Mapping[str, object]) -> dict[str, str]:
    """{name: sha256} of each array, in name order (the same order on every host)."""
    return {name: digest(flat[name]) for name in sorted(flat)}


def problems(flat: Mapping[str, object], expected: Mapping[str, str]) -> list[str]:
    """What differs between ``flat`` and the saved digests (empty: nothing)."""
    missing = sorted(set(expected) - set(flat))
    bad = [name for name in sorted(flat) if name in expected and digest(flat[name]) != expected[name]]
    return ([f"{len(bad)} array(s) differ from their saved sha256 ({', '.join(bad[:4])})"] if bad else []) + (
        [f"{len(missing)} saved array(s) were not restored ({', '.join(missing[:4])})"] if missing else [])


def verify(flat: Mapping[str, object], expected: Mapping[str, str], where: str) -> None:
    """Refuse (CheckpointError naming ``where``) arrays whose bytes differ from the saved digests."""
    found = problems(flat, expected)
    if found:
        raise CheckpointError(
            f"{where} is damaged: {'; '.join(found)}. Its files were altered after it was written (disk fault, an "
            "interrupted copy, an edit); restore it from a good copy or write it again"
        )


def write_file(directory: Path, flat: Mapping[str, object]) -> None:
    """Write checksums.json ({"sha256": {name: digest}}) of ``flat`` into ``directory``."""
    write_digests(directory, digests(flat))


def write_digests(directory: Path, sha256: Mapping[str, str]) -> None:
    """Write checksums.json ({"sha256": {name: digest}}) of digests computed already into ``directory``."""
    (directory / FILE).write_text(json.dumps({"sha256": dict(sha256)}, indent=1, sort_keys=True) + "\n")


def read_file(directory: Path) -> dict[str, str] | None:
    """The digests in ``directory``/checksums.json; None when the checkpoint predates them."""
    path = directory / FILE
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())["sha256"]
        if not isinstance(values, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is damaged (not the JSON lin_llm writes); restore the checkpoint from a "
                              "good copy or write it again") from None
    return values
