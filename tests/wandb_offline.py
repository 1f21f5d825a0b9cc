"""Read an offline W&B run file (`run-<id>.wandb`) back without a server, for the tests.

The file is a LevelDB-style log: a 7-byte header (`:W&B`, magic 0xBEE1, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
4 last); a block's tail shorter than a header is padding. Each record is a `wandb.proto` Record.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        position += _HEADER
        chunk = data[position : position + length]
        position += length
        if kind == 0 and length == 0:
            continue
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _value(item: Any) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def read_run(path: Path) -> dict[str, Any]:
    """{"id", "name", "history": [row dicts], "metrics": {name: step_metric}, "exited": bool}."""
    run: dict[str, Any] = {"history": [], "metrics": {}, "exited": False}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["name"] = record.run.run_id, record.run.display_name
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: _value(i) for i in record.history.item})
        elif kind == "metric":
            run["metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "exit":
            run["exited"] = True
    return run


def run_files(folder: Path) -> list[Path]:
    """Every offline run file under `folder`."""
    return sorted(folder.rglob("run-*.wandb"))


def series(run: dict[str, Any], key: str, x: str = "_step") -> list[tuple[Any, Any]]:
    return [(row.get(x), row[key]) for row in run["history"] if key in row]
