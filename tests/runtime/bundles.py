"""Helpers of the sealed-bundle tests: the artifact modes, the test device's opener and the publisher."""

from keyedge.runtime.bundle import Opener, PublisherKey, PublisherPublicKey, Trust, read_device_key

MODES = {"fused": [], "gather": ["--mode", "gather"], "embedded": ["--mode", "gather", "--embed-key"],
         "kernel": ["--mode", "kernel", "--input", "uint8", "--layout", "nhwc"]}


def opener(root) -> Opener:
    """The device's opener: its private key, and the test publisher pinned."""
    return Opener(read_device_key(root / "device.key"), Trust((PublisherPublicKey.load(root / "publisher.pub"),)))


def publisher(root) -> PublisherKey:
    return PublisherKey.load(root / "publisher.key")


def trust(root) -> list:
    return ["--trust", root / "publisher.pub"]
