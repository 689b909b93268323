"""``keyedge audit``: the key-leakage red team of the files a device holds, its reports, and the release
gate (exit code 3 when an artifact leaks more of the key than ``fail_above``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.io import atomic_write_text, check_output_dir, staged_dir
from ..core.keys import Key
from ..core.keyset import KeySet, load_key_or_set
from ..core.manifests import write_json
from ..core.progress import Echo, echo
from ..redteam.audit import KeyLeak, audit, audit_markdown
from ..redteam.config import AuditConfig
from ..runtime.bundle import DeviceAccess


def audit_release(artifacts: list[Path], base: Path, key_path: Path | Key | KeySet | None, out: Path,
                  cfg: AuditConfig | None = None, *, data: str | None = None, access: DeviceAccess | None = None,
                  force: bool = False, echo: Echo = echo) -> dict[str, Any]:
    """Audit, write ``report.md`` and ``audit.json`` into ``out``, one line per artifact; raises
    :class:`~keyedge.redteam.audit.KeyLeak` (after writing) when the gate fails. A bundle is audited as a
    copy of it stands (ciphertext) and, given the device's private key, as opened on its device too."""
    check_output_dir(out, force)
    key = key_path if key_path is None or isinstance(key_path, (Key, KeySet)) else load_key_or_set(key_path)
    opener = access.opener_for(artifacts, echo) if access is not None else None
    report = audit(artifacts, base, key, cfg, data=data, opener=opener)
    with staged_dir(out, force=force) as stage:
        write_json(stage / "audit.json", report)
        atomic_write_text(stage / "report.md", audit_markdown(report))
    for f in report["artifacts"]:
        leaked = "unknown" if f["fraction"] is None and f["holds_key"] is None else f"{100 * f['leaked']:.1f}%"
        robust = f"; white-box robust {100 * f['whitebox_robust']:.1f}%" if f["whitebox_robust"] is not None else ""
        echo(f"{f['artifact']}: {f['kind']}; key leaked: {leaked}{robust} ({f['method']})")
    echo(f"wrote {out / 'report.md'} and {out / 'audit.json'}")
    if not report["passed"]:
        raise KeyLeak(f"{len(report['leaks'])} artifact(s) leak more than {report['fail_above']:.2f} of the key: "
                      + ", ".join(report["leaks"]))
    return report
