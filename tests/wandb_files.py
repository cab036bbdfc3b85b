"""Read what an offline W&B run wrote, without W&B's servers and without mocking it: the ``.wandb`` transaction
log (W&B's LevelDB-log format: a 7-byte header, 32 KiB blocks of records, each ``crc32 (4) | length (2) | type
(1) | data``, long records split FIRST/MIDDLE/LAST) holds protobuf ``Record`` messages (run, config, summary,
history...); media (tables, images) are plain files under ``files/media/``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def offline_run(folder: Path) -> dict:
    """``{"run": {group, tags, job_type}, "config": {key: value}, "summary": {key: value}, "files": [...]}``, and
    ``exit_code`` once the run was finished."""
    out: dict = {"config": {}, "summary": {}, "run": {}, "history_keys": set()}
    (log,) = Path(folder).glob("*.wandb")
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"group": rec.run.run_group, "tags": list(rec.run.tags), "job_type": rec.run.job_type}
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif kind == "history":
            out["history_keys"] |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    out["files"] = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    return out
