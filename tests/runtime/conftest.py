"""Sealed bundles of every mode, sealed to one test device and signed by one test publisher."""

import pytest

from ..helpers import keyedge
from .bundles import MODES


@pytest.fixture(scope="package")
def sealed(tmp_path_factory, trained_keyed):
    """A device key pair and a publisher key pair; an artifact of every mode; each sealed to the device and
    signed by the publisher."""
    run, key_path, key, _ = trained_keyed
    root = tmp_path_factory.mktemp("seal")
    r = keyedge("device", "keygen", "-o", root / "device.key")
    assert r.returncode == 0, r.stderr
    r = keyedge("publisher", "keygen", "-o", root / "publisher.key")
    assert r.returncode == 0, r.stderr
    for name, args in MODES.items():
        assert keyedge("export", run, "--key", key_path, "-o", root / name, *args).returncode == 0
        r = keyedge("seal", root / name, "--to", root / "device.pub", "-o", root / f"{name}.kes", "--key", key_path,
                    "--sign-with", root / "publisher.key")
        assert r.returncode == 0, r.stderr
    return root, key
