"""``keyedge fleet export --to DIR``: the hand-off to the OTA system a fleet already runs (Mender, balena,
Greengrass): every released device's signed, sealed bundle, the publisher's public key, and one index, in
a new directory written atomically (built under a temporary name, renamed into place).

``DIR/index.json``::

    {"format": "keyedge-fleet-export", "version": 1, "exported_at": ISO time,
     "publisher": {"fingerprint": ..., "public_key": "publisher.pub"},
     "ensemble": N or null,
     "devices": [{"device": id, "target": profile, "state": released | revoked | ...,
                  "release": N, "bundle": "bundles/ID.kes", "sha256": hex, "bytes": n,
                  "key_fingerprint": ..., "publisher": fingerprint,
                  "revoked": [{"release": N, "sha256": hex, "reason": text, "revoked_at": ISO time}]}]}

A device without a current bundle (revoked, or not released yet) is listed with ``"bundle": null``;
``revoked`` lists every bundle of the device that must no longer be shipped. ``ensemble``: in a fleet of
random ensembles, every bundle holds one gathered graph of N members, served by ONNX Runtime (no TensorRT
engine is built for it on the device). Each bundle is checked
against the SHA-256 recorded at its release before it is copied: one that changed since is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError
from ..core.io import check_new_dir, new_dir, write_new_file
from ..core.models import file_sha256
from ..core.progress import Echo, echo
from . import db
from .commands import status_in
from .pinned import ensemble_size, fleet_row
from .schema import devices, releases

FORMAT, VERSION = "keyedge-fleet-export", 1


def _revoked(conn) -> dict[str, list[dict[str, Any]]]:
    rows = conn.execute(releases.select().join(devices, releases.c.device == devices.c.id)
                        .add_columns(devices.c.device_id.label("device_id"))
                        .where(releases.c.state == "revoked").order_by(releases.c.number)).all()
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.device_id, []).append({"release": r.number, "sha256": r.bundle_sha256, "reason": r.reason,
                                                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None})
    return out


def _copy_hashed(source: Path, dest: Path, chunk: int = 1 << 22) -> str:
    """Copy in chunks (a ViT-B/16 bundle is 344 MB), hashing what is written; the copy's SHA-256."""
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
        while block := src.read(chunk):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def export_fleet(database: str, to: Path, *, echo: Echo = echo) -> dict[str, Any]:
    """Write the OTA hand-off into the new directory ``to``; returns the index."""
    check_new_dir(to)
    with db.transaction(database) as conn:  # one view of the fleet: a revocation is in all of it or none
        spec = fleet_row(conn, database)
        revoked = _revoked(conn)
        report = status_in(conn, database)
    entries, files = [], {}
    for d in report["devices"]:
        b = d["bundle"]
        entry: dict[str, Any] = {"device": d["device"], "target": d["target"], "state": d["state"],
                                 "release": None, "bundle": None, "sha256": None, "bytes": None,
                                 "key_fingerprint": None, "publisher": None, "revoked": revoked.get(d["device"], [])}
        if b is not None:
            path = Path(b["path"])
            if not path.is_file():
                raise KeyedgeError(f"the bundle of {d['device']} (release {b['release']}) is gone: {path}")
            if file_sha256(path) != b["sha256"]:
                raise KeyedgeError(f"the bundle of {d['device']} changed since its release (sha256 mismatch): {path}")
            name = f"bundles/{d['device']}.kes"
            files[name] = (path, b["sha256"])
            entry.update(release=b["release"], bundle=name, sha256=b["sha256"], bytes=b["bytes"],
                         key_fingerprint=b["key_fingerprint"], publisher=b["publisher"])
        entries.append(entry)
    index = {"format": FORMAT, "version": VERSION, "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(),
             "publisher": {"fingerprint": spec.publisher_fingerprint, "public_key": "publisher.pub"},
             "ensemble": ensemble_size(spec), "devices": entries}
    from ..runtime.bundle import PublisherPublicKey

    with new_dir(to) as stage:  # ciphertext and public data only: readable by the OTA tool's user too
        stage.chmod(0o755)
        (stage / "bundles").mkdir(mode=0o755)
        for name, (path, sha256) in files.items():
            if _copy_hashed(path, stage / name) != sha256:  # what is shipped is what was released
                raise KeyedgeError(f"{path} changed while it was exported")
        write_new_file(stage / "publisher.pub", PublisherPublicKey(spec.publisher_public).to_bytes(), mode=0o644)
        write_new_file(stage / "index.json", (json.dumps(index, indent=2) + "\n").encode(), mode=0o644)
    shipped = sum(1 for e in entries if e["bundle"])
    echo(f"wrote {to}: {shipped} bundle(s), {sum(1 for e in entries if e['state'] == 'revoked')} revoked device(s), "
         f"index.json and publisher.pub (publisher {spec.publisher_fingerprint})")
    return index

