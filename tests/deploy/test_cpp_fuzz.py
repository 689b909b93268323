"""The C++ runtime's parsers under fuzzing: the targets of tests/fuzz (a whole sealed bundle: header, publisher,
signature, decryption and index; a bundle's payload: index, manifest and key; manifests; key files and
publisher keys), built with g++, AddressSanitizer and UndefinedBehaviorSanitizer against export/cpp/src,
each run over its seed corpus (ok-* accepted, bad-* refused with a one-line keyedge::Error) and then on
mutations of it for a bounded time. A multi-chunk bundle, too large to commit, is checked here as well."""

import os
import shutil
import subprocess

import pytest

from ..fuzz import make_corpus

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                reason="cmake and g++ are needed to build the fuzz targets")
TARGETS = ("manifest", "key_file", "bundle_index", "bundle_file")
SECONDS = 15  # of mutations per target
HEADERS = "#include <sodium.h>\n#include <openssl/evp.h>\n#include <nlohmann/json.hpp>\n"
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory):
    """The build folder of the four targets."""
    probe = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-x", "c++", "-"], input=HEADERS,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("libsodium, OpenSSL or nlohmann-json headers are missing "
                    "(apt install libsodium-dev libssl-dev nlohmann-json3-dev)")
    build = tmp_path_factory.mktemp("fuzz-build")
    for cmd in (["cmake", "-S", str(make_corpus.HERE), "-B", str(build)], ["cmake", "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build


def _fuzz(build, target, *args, timeout=120):
    r = subprocess.run([str(build / f"fuzz_{target}"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **SANITIZER_ENV})
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-6000:]
    return r


def _outcomes(stdout: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in stdout.splitlines() if "\t" in line)


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_survives_its_corpus_and_its_mutations(fuzzers, target, tmp_path):
    r = _fuzz(fuzzers, target, "--check-names", "--seconds", SECONDS, "--seed", 20240, "--crash-dir", tmp_path,
              make_corpus.CORPUS / target)
    assert r.returncode == 0 and "no failure" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
    assert " 0 mutated inputs" not in r.stdout and not list(tmp_path.glob("crash-*"))


def test_regression_inputs_are_refused_in_one_line(fuzzers, tmp_path):
    """Every bad-* seed, and the inputs too large to commit (300000 '['), is a keyedge::Error of one line."""
    extra = make_corpus.regressions()
    outcomes = {}
    for target in TARGETS:
        paths = [make_corpus.CORPUS / target]
        if target in extra:
            (tmp_path / target).mkdir()
            for name, data in extra[target].items():
                (tmp_path / target / name).write_bytes(data)
            paths.append(tmp_path / target)
        r = _fuzz(fuzzers, target, "--check-names", "--outcomes", *paths)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outcomes.update(_outcomes(r.stdout))
    bad = {name: o for name, o in outcomes.items() if name.startswith("bad-")}
    assert len(bad) >= 60 and all(o.startswith("refused: ") for o in bad.values())
    for name, needle in (("bad-nested-300000.json", "nested deeper than 64 levels"),
                         ("bad-nested-300000.payload", "nested deeper than 64 levels"),
                         ("bad-version-1e300-in-manifest.json", "no valid format version"),
                         ("bad-1e400.json", "not valid JSON"), ("bad-minus.json", "not valid JSON"),
                         ("bad-plus.json", "not valid JSON"),
                         ("bad-m32768-c4-n0.keyfile", "length does not match its block size"),
                         ("bad-duplicate-names.payload", "is in it twice"),
                         ("bad-dotdot-name.payload", "'../x' is not a plain file name"),
                         ("bad-block-size-mismatch.json", "preprocess.block_size is not the manifest's block_size"),
                         ("bad-block-size-not-dividing.json", "does not divide the input size"),
                         ("bad-unsigned.kes", "is not signed by a publisher"),
                         ("bad-other-publisher.kes", "which is not trusted"),
                         ("bad-signature.kes", "the publisher's signature does not verify"),
                         ("bad-version-2.kes", "seal it again")):
        assert needle in bad[name], (name, bad[name])
    assert {o for name, o in outcomes.items() if name.startswith("ok-")} == {"ok"}


def test_a_multi_chunk_bundle_and_its_changed_chunks(fuzzers, tmp_path):
    """A signed bundle of three 1 MiB chunks opens; its records changed, dropped or swapped are refused, by the
    signature, or (re-signed, so that the signature verifies) by the authenticated decryption."""
    files = [("model.onnx", os.urandom(5 << 19))] + make_corpus._sealed_files()[1:]
    plain = make_corpus.payload(files)
    signer = make_corpus.publisher()

    def flip_middle(records):
        middle = bytearray(records[1])
        middle[1000] ^= 1
        return [records[0], bytes(middle), *records[2:]]

    bundles = {
        "ok-three-chunks.kes": make_corpus.seal(plain, signer=signer),
        "bad-changed-resigned.kes": make_corpus.seal(plain, signer=signer, tamper=flip_middle),
        "bad-dropped-last-resigned.kes": make_corpus.seal(plain, signer=signer, tamper=lambda r: r[:-1]),
        "bad-swapped-resigned.kes": make_corpus.seal(plain, signer=signer, tamper=lambda r: [r[1], r[0], *r[2:]]),
    }
    changed = bytearray(bundles["ok-three-chunks.kes"])
    changed[len(changed) // 2] ^= 1
    bundles["bad-changed.kes"] = bytes(changed)
    for name, data in bundles.items():
        (tmp_path / name).write_bytes(data)
    r = _fuzz(fuzzers, "bundle_file", "--check-names", "--outcomes", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    outcomes = _outcomes(r.stdout)
    assert len(bundles["ok-three-chunks.kes"]) > 2 * make_corpus.CHUNK and outcomes["ok-three-chunks.kes"] == "ok"
    assert "signature does not verify" in outcomes["bad-changed.kes"]
    for name in ("bad-changed-resigned.kes", "bad-dropped-last-resigned.kes", "bad-swapped-resigned.kes"):
        assert "authentication failed" in outcomes[name], (name, outcomes[name])
