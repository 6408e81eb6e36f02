"""CoRIM reference values (verifier/gpu/corim.py): signed CoRIMs synthesized in NVIDIA's
shape (swtpm/corim_sim.py) by the simulation's RIM signer, loaded to a Rim that the GPU
appraisal accepts against a simulated GPU's report; each signature, chain, thumbprint and
format check refused with a named reason."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtrust.core.binding import gpu_nonce
from devtrust.swtpm import corim_sim
from devtrust.swtpm.gpu_sim import SimGpu, SimGpuRoots, driver_rim
from devtrust.verifier.gpu.appraise import GpuAnchors, GpuVerdict, HostGpu, appraise_report
from devtrust.verifier.gpu.corim import (
    MAX_CORIM_BYTES,
    is_corim,
    load_any_rim,
    load_corim,
    load_corim_file,
)
from devtrust.verifier.gpu.rim import FileRims, RimFormatError, RimSignatureError
from devtrust.verifier.gpu.types import REPORT, GpuEvidence, Rim, RimKind
from devtrust.verifier.trust import Claim, Severity

NOW = datetime.now(UTC)
DRIVER = "550.90.07"
VBIOS = "96.00.9F.00.01"


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> SimGpuRoots:
    return SimGpuRoots.create(tmp_path_factory.mktemp("gpu-roots"), now=NOW)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> SimGpuRoots:
    """Another simulation: its RIM root is not the verifier's."""
    return SimGpuRoots.create(tmp_path_factory.mktemp("other-roots"), now=NOW)


@pytest.fixture(scope="module")
def gpu(roots: SimGpuRoots) -> SimGpu:
    return SimGpu.create(roots, 0, driver_version=DRIVER, vbios_version=VBIOS, now=NOW)


def _load(roots: SimGpuRoots, data: bytes, **kwargs: Any) -> Rim:
    return load_corim(data, roots=[roots.rim_root], at=NOW, source="test.corim", **kwargs)


def _appraise(roots: SimGpuRoots, gpu: SimGpu, *rims: Rim) -> GpuVerdict:
    nonce = gpu_nonce(b"\x01" * 32, gpu.index)
    evidence = GpuEvidence(
        gpu.index, REPORT, report=gpu.report(nonce), certificates=tuple(gpu.certificates())
    )
    anchors = GpuAnchors(device_roots=(roots.device_root,), rims=FileRims(rims))
    return appraise_report(
        evidence,
        HostGpu(gpu.index, "GPU 0 (sim)", VBIOS),
        driver_version=DRIVER,
        expected_nonce=nonce,
        anchors=anchors,
        now=NOW,
        device_id="dev-1",
    )


def _signed(roots: SimGpuRoots, payload: Any, **kwargs: Any) -> bytes:
    kwargs.setdefault("x5chain", [roots.rim_signer])
    return corim_sim.sign(payload, roots.rim_signer_key, **kwargs)


def _driver_payload(roots: SimGpuRoots, comid: Any = None, **kwargs: Any) -> cbor2.CBORTag:
    if comid is None:
        comid = corim_sim.comid(corim_sim.spdm_values("driver", DRIVER))
    return corim_sim.corim_map(
        corim_sim.corim_id("driver", DRIVER), [comid], signer=roots.rim_signer, **kwargs
    )


# -- good CoRIMs ------------------------------------------------------------------------


def test_corims_with_the_gpus_values_pass_the_appraisal(roots: SimGpuRoots, gpu: SimGpu) -> None:
    driver = _load(roots, corim_sim.corim(roots, "driver", DRIVER))
    vbios = _load(roots, corim_sim.corim(roots, "vbios", VBIOS))
    assert (driver.kind, driver.version, driver.product) == (RimKind.DRIVER, DRIVER, "GH100")
    assert (vbios.kind, vbios.version) == (RimKind.VBIOS, VBIOS)
    assert driver.format == vbios.format == "corim"
    assert driver.tag_id == "NV_GPU_DRIVER_GH100_550.90.07"
    assert vbios.tag_id == "NV_GPU_VBIOS_1010_0200_882_96009F0001"
    assert driver.signer == roots.rim_signer.subject.rfc4514_string()
    # SPDM indices (RIM index + 1), both alternatives of a two-valued index.
    by_index = {m.index: m for m in driver.measurements}
    assert sorted(by_index) == sorted(corim_sim.spdm_values("driver", DRIVER))
    assert len(by_index[24].alternatives) == 2
    assert all(m.size == 48 for m in driver.measurements)
    verdict = _appraise(roots, gpu, driver, vbios)
    assert [f.id for f in verdict.findings if f.severity is not Severity.INFO] == []
    assert verdict.worst in (None, Severity.INFO)
    assert verdict.claims[Claim.EXECUTABLES] == 2


def test_same_values_as_the_swid_tag_rim(roots: SimGpuRoots) -> None:
    from devtrust.verifier.gpu.rim import load_rim

    swid = load_rim(driver_rim(roots, DRIVER), roots=[roots.rim_root], at=NOW)
    corim = _load(roots, corim_sim.corim(roots, "driver", DRIVER))
    assert [(m.index, m.alternatives) for m in swid.measurements] == [
        (m.index, m.alternatives) for m in corim.measurements
    ]


def test_a_changed_digest_gives_a_measurement_mismatch(roots: SimGpuRoots, gpu: SimGpu) -> None:
    values = corim_sim.spdm_values("vbios", VBIOS)
    values[2] = (hashlib.sha384(b"another FSP").digest(),)
    vbios = _load(
        roots,
        corim_sim.sign(
            corim_sim.corim_map(
                corim_sim.corim_id("vbios", VBIOS),
                [corim_sim.comid(values)],
                signer=roots.rim_signer,
            ),
            roots.rim_signer_key,
            x5chain=[roots.rim_signer],
        ),
    )
    driver = _load(roots, corim_sim.corim(roots, "driver", DRIVER))
    verdict = _appraise(roots, gpu, driver, vbios)
    mismatches = [f for f in verdict.findings if f.id == "gpu.measurement.mismatch"]
    assert len(mismatches) == 1
    assert values[2][0].hex() in mismatches[0].expected


def test_operator_signer_when_the_corim_carries_none(roots: SimGpuRoots) -> None:
    data = corim_sim.corim(roots, "driver", DRIVER, x5chain=False)
    with pytest.raises(RimSignatureError, match=r"no signer certificate.*--signer"):
        _load(roots, data)
    assert _load(roots, data, signer=[roots.rim_signer]).version == DRIVER


def test_operator_signer_is_used_over_x5chain(roots: SimGpuRoots, other: SimGpuRoots) -> None:
    """The certificate the operator gives is the one verified, not the CoRIM's own."""
    data = corim_sim.corim(roots, "driver", DRIVER)  # x5chain: roots' signer
    with pytest.raises(RimSignatureError, match="does not verify"):
        load_corim(data, roots=[other.rim_root], at=NOW, signer=[other.rim_signer])


def test_x5chain_in_the_unprotected_header_is_a_candidate_key(
    roots: SimGpuRoots, other: SimGpuRoots
) -> None:
    good = _signed(roots, _driver_payload(roots), x5chain_protected=False)
    assert _load(roots, good).version == DRIVER
    # Another key's certificate there (chaining to another root) is refused by the chain.
    forged = corim_sim.sign(
        _driver_payload(other),
        other.rim_signer_key,
        x5chain=[other.rim_signer],
        x5chain_protected=False,
    )
    with pytest.raises(RimSignatureError, match="certificate path to a RIM root"):
        _load(roots, forged)


@pytest.mark.parametrize(
    ("curve", "alg"), [(ec.SECP256R1(), -7), (ec.SECP384R1(), -35), (ec.SECP521R1(), -36)]
)
def test_nvidias_three_level_pki_with_each_algorithm(curve: ec.EllipticCurve, alg: int) -> None:
    """Signer -> sub-CA -> root, the operator giving the signer and sub-CA (not embedded)."""
    pki = corim_sim.CorimPki.create(curve)
    payload = corim_sim.corim_map(
        corim_sim.corim_id("driver", DRIVER),
        [corim_sim.comid(corim_sim.spdm_values("driver", DRIVER))],
        signer=pki.signer,
    )
    data = corim_sim.sign(payload, pki.signer_key, alg=alg)
    rim = load_corim(data, roots=[pki.root], at=NOW, signer=[pki.signer, pki.sub_ca])
    assert rim.signer == pki.signer.subject.rfc4514_string()
    with pytest.raises(RimSignatureError, match="certificate path"):  # no sub-CA: no path
        load_corim(data, roots=[pki.root], at=NOW, signer=[pki.signer])


def test_a_key_on_another_curve_than_alg_says_is_refused() -> None:
    pki = corim_sim.CorimPki.create(ec.SECP256R1())
    payload = corim_sim.corim_map(
        corim_sim.corim_id("driver", DRIVER), [corim_sim.comid({2: (bytes(48),)})]
    )
    data = corim_sim.sign(payload, pki.signer_key, alg=-35)  # ES384 named, P-256 key
    with pytest.raises(
        RimSignatureError, match="expected a secp384r1 key for ES384, found secp256r1"
    ):
        load_corim(data, roots=[pki.root], at=NOW, signer=[pki.signer, pki.sub_ca])


# -- signature, chain, thumbprint, validity ---------------------------------------------


def test_a_changed_payload_byte_breaks_the_signature(roots: SimGpuRoots) -> None:
    data = corim_sim.corim(roots, "driver", DRIVER)
    value = corim_sim.spdm_values("driver", DRIVER)[8][0]
    at = data.index(value)
    changed = data[:at] + bytes([value[0] ^ 1]) + data[at + 1 :]
    with pytest.raises(RimSignatureError, match=r"signature .* does not verify"):
        _load(roots, changed)


def test_a_changed_protected_header_breaks_the_signature(roots: SimGpuRoots) -> None:
    data = corim_sim.corim(roots, "driver", DRIVER)
    meta = cbor2.dumps({0: {0: "NVIDIA stand-in: devtrust simulation"}})
    forged = data.replace(meta, meta[:-1] + b"X")
    assert forged != data
    with pytest.raises(RimSignatureError, match="does not verify"):
        _load(roots, forged)


def test_a_signature_of_the_wrong_size_is_refused(roots: SimGpuRoots) -> None:
    data = corim_sim.corim(roots, "driver", DRIVER)
    sign1 = cbor2.loads(data).value.value
    short = cbor2.dumps(cbor2.CBORTag(502, [*sign1[:3], sign1[3][:-1]]))
    with pytest.raises(RimSignatureError, match=r"96-byte ES384 signature .* found 95"):
        _load(roots, short)


def test_another_root_is_a_chain_error(roots: SimGpuRoots, other: SimGpuRoots) -> None:
    data = corim_sim.corim(other, "driver", DRIVER)
    with pytest.raises(RimSignatureError, match="certificate path to a RIM root"):
        _load(roots, data)


def test_an_expired_signer_names_the_time(roots: SimGpuRoots) -> None:
    data = corim_sim.corim(roots, "driver", DRIVER)
    later = NOW + timedelta(days=3660 * 2)
    with pytest.raises(RimSignatureError, match=r"expired .*--at"):
        load_corim(data, roots=[roots.rim_root], at=later)


def test_a_thumbprint_of_another_certificate_is_refused(
    roots: SimGpuRoots, other: SimGpuRoots
) -> None:
    payload = _driver_payload(roots)
    payload.value[2] = [
        {0: "https://rim.example/signer.pem", 1: corim_sim.thumbprint(other.rim_signer)}
    ]
    with pytest.raises(
        RimSignatureError, match="dependent-rims: expected a thumbprint of the signer"
    ):
        _load(roots, _signed(roots, payload))


def test_thumbprints_of_the_signer_in_other_forms_are_accepted(roots: SimGpuRoots) -> None:
    pem = roots.rim_signer.public_bytes(serialization.Encoding.PEM)
    der = roots.rim_signer.public_bytes(serialization.Encoding.DER)
    for thumb in ([1, hashlib.sha256(pem).digest()], [[7, hashlib.sha384(der).digest()]]):
        payload = _driver_payload(roots)
        payload.value[2] = [{0: cbor2.CBORTag(32, "https://rim.example/s.pem"), 1: thumb}]
        assert _load(roots, _signed(roots, payload)).version == DRIVER


def test_rim_validity_is_checked(roots: SimGpuRoots) -> None:
    def epoch(at: datetime) -> cbor2.CBORTag:
        return cbor2.CBORTag(1, int(at.timestamp()))

    past = epoch(NOW - timedelta(days=2))
    payload = _driver_payload(roots, extra={4: {1: past}})
    with pytest.raises(RimSignatureError, match="rim-validity"):
        _load(roots, _signed(roots, payload))
    payload = _driver_payload(roots, extra={4: {0: past, 1: epoch(NOW + timedelta(days=1))}})
    assert _load(roots, _signed(roots, payload)).version == DRIVER


def test_version_from_the_comid_when_the_id_is_not_nvidias(roots: SimGpuRoots) -> None:
    values = corim_sim.spdm_values("vbios", VBIOS)
    payload = corim_sim.corim_map(
        cbor2.CBORTag(37, bytes(16)), [corim_sim.comid(values, version=VBIOS, product="GH100")]
    )
    rim = _load(roots, _signed(roots, payload))
    assert (rim.kind, rim.version, rim.product) == (RimKind.VBIOS, VBIOS, "GH100")
    assert rim.tag_id == "00000000-0000-0000-0000-000000000000"


def test_a_comid_version_disagreeing_with_the_id_is_refused(roots: SimGpuRoots) -> None:
    comid = corim_sim.comid(corim_sim.spdm_values("driver", DRIVER), version="545.00")
    with pytest.raises(RimFormatError, match=r"corim.tags: expected mval versions equal .*545.00"):
        _load(roots, _signed(roots, _driver_payload(roots, comid)))


def test_load_corim_file_and_dispatch(roots: SimGpuRoots, tmp_path: Path) -> None:
    path = tmp_path / "driver.corim"
    path.write_bytes(corim_sim.corim(roots, "driver", DRIVER))
    assert load_corim_file(path, roots=[roots.rim_root], at=NOW).source == str(path)
    assert is_corim(path.read_bytes())
    assert not is_corim(b"\xef\xbb\xbf\n  " + driver_rim(roots, DRIVER))


def test_load_any_rim_reads_both_formats(roots: SimGpuRoots) -> None:
    swid = load_any_rim(driver_rim(roots, DRIVER), roots=[roots.rim_root], at=NOW, source="s")
    corim = load_any_rim(
        corim_sim.corim(roots, "driver", DRIVER, x5chain=False),
        roots=[roots.rim_root],
        at=NOW,
        signer=[roots.rim_signer],
        source="c",
    )
    assert (swid.format, corim.format) == ("swid", "corim")
    assert [(m.index, m.alternatives, m.size) for m in swid.measurements] == [
        (m.index, m.alternatives, m.size) for m in corim.measurements
    ]


@pytest.mark.parametrize(
    ("identifier", "kind", "version", "product"),
    [
        ("NV_GPU_DRIVER_GH100_535.104.05", RimKind.DRIVER, "535.104.05", "GH100"),
        ("NV_GPU_CC_DRIVER_GB100_575.57.08", RimKind.DRIVER, "575.57.08", "GB100"),
        ("NV_GPU_VBIOS_1010_0200_882_96005E0001", RimKind.VBIOS, "96.00.5E.00.01", "GH100"),
        ("NV_GPU_VBIOS_1010_0210_886_96009f0004", RimKind.VBIOS, "96.00.9F.00.04", "GH100"),
    ],
)
def test_nvidia_rim_ids_give_kind_version_and_product(
    roots: SimGpuRoots, identifier: str, kind: RimKind, version: str, product: str
) -> None:
    payload = corim_sim.corim_map(identifier, [corim_sim.comid({2: (bytes(48),)})])
    rim = _load(roots, _signed(roots, payload))
    assert (rim.kind, rim.version, rim.product, rim.tag_id) == (kind, version, product, identifier)


# -- format errors, each naming its field -----------------------------------------------


def _measurement_path(n: int = 0) -> str:
    return rf"corim\.tags\[0\]\.triples\.reference\[0\]\.measurements\[{n}\]"


def _comid_with(mutate: Callable[[dict[Any, Any]], None]) -> dict[Any, Any]:
    comid = corim_sim.comid(corim_sim.spdm_values("driver", DRIVER))
    mutate(comid)
    return comid


def _first_mval(comid: dict[Any, Any]) -> dict[Any, Any]:
    mval: dict[Any, Any] = comid[4][0][0][1][0][1]
    return mval


# Signed payloads that are not what a CoRIM says: (name, payload maker, message pattern).
PAYLOAD_CASES: list[tuple[str, Callable[[SimGpuRoots], Any], str]] = [
    (
        "unsigned-payload-tag",
        lambda r: cbor2.CBORTag(506, {}),
        r"corim\.payload: expected CBOR tag 501",
    ),
    (
        "no-tags",
        lambda r: cbor2.CBORTag(501, {0: "NV_GPU_DRIVER_GH100_550.90.07"}),
        r"corim\.tags: expected a value \(key 1\)",
    ),
    ("no-id", lambda r: cbor2.CBORTag(501, {1: []}), r"corim\.id: expected a value \(key 0\)"),
    (
        "not-a-comid",
        lambda r: corim_sim.corim_map("x", [cbor2.CBORTag(505, b"\xa0")]),
        r"corim\.tags\[0\]: expected CBOR tag 506, found tag 505",
    ),
    (
        "comid-not-cbor",
        lambda r: corim_sim.corim_map("x", [b"\x18"]),
        r"corim\.tags\[0\]: expected well-formed CBOR, found the data ends at byte 1",
    ),
    (
        "no-triples",
        lambda r: _driver_payload(r, _comid_with(lambda c: c.pop(4))),
        r"corim\.tags\[0\]\.triples: expected a value \(key 4\)",
    ),
    (
        "no-mval",
        lambda r: _driver_payload(r, _comid_with(lambda c: c[4][0][0][1][0].pop(1))),
        _measurement_path() + r"\.mval: expected a value",
    ),
    (
        "short-digest",
        lambda r: _driver_payload(
            r, _comid_with(lambda c: _first_mval(c).update({2: [[7, bytes(47)]]}))
        ),
        _measurement_path() + r"\.mval\.digests\[0\]\[1\]: expected 48 bytes \(sha-384\), found 47",
    ),
    (
        "unknown-digest-alg",
        lambda r: _driver_payload(
            r, _comid_with(lambda c: _first_mval(c).update({2: [[99, bytes(48)]]}))
        ),
        _measurement_path() + r"\.mval\.digests\[0\]\[0\]: expected sha-256",
    ),
    (
        "digest-alg-a-map",
        lambda r: _driver_payload(
            r, _comid_with(lambda c: _first_mval(c).update({2: [[{}, bytes(48)]]}))
        ),
        _measurement_path() + r"\.mval\.digests\[0\]\[0\]: expected sha-256",
    ),
    (
        "mixed-sizes",
        lambda r: _driver_payload(
            r, _comid_with(lambda c: _first_mval(c).update({2: [[7, bytes(48)], [1, bytes(32)]]}))
        ),
        _measurement_path() + r"\.mval: expected values of one size, found sizes 48, 32",
    ),
    (
        "masked-raw",
        lambda r: _driver_payload(
            r, _comid_with(lambda c: _first_mval(c).update({4: b"x", 5: b"\xff"}))
        ),
        _measurement_path() + r"\.mval\.raw-value-mask",
    ),
    (
        "no-values",
        lambda r: _driver_payload(r, _comid_with(lambda c: _first_mval(c).pop(2))),
        _measurement_path() + r"\.mval: expected digests or a raw-value",
    ),
    (
        "index-zero",
        lambda r: _driver_payload(r, _comid_with(lambda c: c[4][0][0][1][0].update({0: 0}))),
        _measurement_path() + r"\.mkey: expected an SPDM measurement index 1 to 254, found 0",
    ),
    (
        "index-repeated",
        lambda r: _driver_payload(
            r, _comid_with(lambda c: c[4][0][0][1][1].update({0: c[4][0][0][1][0][0]}))
        ),
        _measurement_path(1) + r"\.mkey: expected each SPDM index once",
    ),
    (
        "not-nvidias-id",
        lambda r: corim_sim.corim_map("my-rim", [corim_sim.comid({2: (bytes(48),)})]),
        r"corim\.id: expected an NVIDIA RIM id",
    ),
    (
        "nested-too-deep",
        lambda r: corim_sim.corim_map("x", [{1: {0: "t"}, 4: {0: [[{0: {9: _nested(12)}}, []]]}}]),
        r"corim\.tags\[0\]: expected nesting at most 16 deep",
    ),
]


@pytest.mark.parametrize(
    ("make", "pattern"), [(m, p) for _, m, p in PAYLOAD_CASES], ids=[n for n, _, _ in PAYLOAD_CASES]
)
def test_signed_payload_format_errors_name_the_field(
    roots: SimGpuRoots, make: Callable[[SimGpuRoots], Any], pattern: str
) -> None:
    with pytest.raises(RimFormatError, match=pattern) as raised:
        _load(roots, _signed(roots, make(roots)))
    assert str(raised.value).startswith("CoRIM test.corim: ")


def _nested(depth: int) -> list[Any]:
    value: list[Any] = [0]
    for _ in range(depth - 1):
        value = [value]
    return value


def _sign1(roots: SimGpuRoots) -> list[Any]:
    return list(cbor2.loads(corim_sim.corim(roots, "driver", DRIVER)).value.value)


def _bad_version_certificate(roots: SimGpuRoots) -> bytes:
    """The signer's certificate with X.509 version 95 (cryptography: InvalidVersion)."""
    der = bytearray(roots.rim_signer.public_bytes(serialization.Encoding.DER))
    at = der.index(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))
    der[at + 4] = 95
    return bytes(der)


# Documents broken outside the signed payload: (name, bytes maker, message pattern).
DOCUMENT_CASES: list[tuple[str, Callable[[SimGpuRoots], bytes], str]] = [
    (
        "not-cbor",
        lambda r: b"\x1c\x00",
        r"corim: expected well-formed CBOR, found reserved value 28 at byte 0",
    ),
    (
        "truncated",
        lambda r: corim_sim.corim(r, "driver", DRIVER)[:-10],
        r"corim: expected well-formed CBOR, found a string of 96 bytes",
    ),
    (
        "trailing-bytes",
        lambda r: corim_sim.corim(r, "driver", DRIVER) + b"\x00",
        r"corim: expected one CBOR item, found 1 bytes after it",
    ),
    (
        "unsigned-corim",
        lambda r: cbor2.dumps(_driver_payload(r)),
        r"corim: expected a signed CoRIM \(tag 502\), found an unsigned",
    ),
    (
        "bare-cose",
        lambda r: cbor2.dumps(cbor2.CBORTag(18, _sign1(r))),
        r"corim: expected CBOR tag 502, found tag 18",
    ),
    (
        "three-items",
        lambda r: cbor2.dumps(cbor2.CBORTag(502, _sign1(r)[:3])),
        r"corim\.COSE_Sign1: expected an array of 4 to 4 items, found 3",
    ),
    (
        "detached-payload",
        lambda r: cbor2.dumps(cbor2.CBORTag(502, [*_sign1(r)[:2], None, _sign1(r)[3]])),
        r"corim\.COSE_Sign1\.payload: expected a byte string, found None",
    ),
    (
        "no-alg",
        lambda r: cbor2.dumps(
            cbor2.CBORTag(502, [cbor2.dumps({3: "application/rim+cbor"}), *_sign1(r)[1:]])
        ),
        r"corim\.COSE_Sign1\.protected\.alg: expected a value \(key 1\)",
    ),
    (
        "rsa-alg",
        lambda r: _signed(r, _driver_payload(r), protected={1: -37}),
        r"corim\.COSE_Sign1\.protected\.alg: expected ES256 .*found -37",
    ),
    (
        "content-type",
        lambda r: _signed(r, _driver_payload(r), protected={3: "application/cbor"}),
        r"protected\.content-type: expected 'application/rim\+cbor'",
    ),
    (
        "unknown-crit",
        lambda r: _signed(r, _driver_payload(r), protected={2: [99], 99: 1}),
        r"protected\.crit: expected only labels",
    ),
    (
        "meta-without-signer",
        lambda r: _signed(r, _driver_payload(r), protected={8: cbor2.dumps({1: {}})}),
        r"protected\.corim-meta\.signer: expected a value \(key 0\)",
    ),
    (
        "bad-x5chain",
        lambda r: _signed(r, _driver_payload(r), protected={33: b"not DER"}),
        r"protected\.x5chain\[0\]: expected a DER certificate",
    ),
    (
        "x5chain-bad-version",
        lambda r: _signed(r, _driver_payload(r), protected={33: _bad_version_certificate(r)}),
        r"protected\.x5chain\[0\]: expected a DER certificate, found 95 is not a valid",
    ),
    (
        "crit-label-a-map",
        lambda r: _signed(r, _driver_payload(r), protected={2: [{}]}),
        r"protected\.crit: expected only labels",
    ),
    (
        "alg-a-map",
        lambda r: cbor2.dumps(cbor2.CBORTag(502, [cbor2.dumps({1: {}}), *_sign1(r)[1:]])),
        r"protected\.alg: expected ES256 \(-7\), ES384 \(-35\) or ES512 \(-36\), found a map",
    ),
    (
        "indefinite-length",
        lambda r: b"\xd9\x01\xf6\x9f\xff",
        r"corim: expected definite lengths only, found an indefinite length at byte 3",
    ),
    (
        "shared-reference-tag",
        lambda r: cbor2.dumps(
            cbor2.CBORTag(502, [*_sign1(r)[:1], {0: cbor2.CBORTag(28, [1])}, *_sign1(r)[2:]])
        ),
        r"corim: expected only the CBOR tags CoRIM uses, found tag 28",
    ),
    (
        "deep-unprotected",
        lambda r: cbor2.dumps(cbor2.CBORTag(502, [_sign1(r)[0], {0: _nested(20)}, *_sign1(r)[2:]])),
        r"corim: expected nesting at most 16 deep",
    ),
    (
        "duplicate-key",
        lambda r: b"\xd9\x01\xf6\x84\x40\xa2\x01\x01\x01\x02\x40\x40",
        r"corim: expected well-formed CBOR, found .*[Dd]uplicate",
    ),
    (
        "huge-length",
        lambda r: b"\xd9\x01\xf6\x9b\x00\x00\x00\x10\x00\x00\x00\x00",
        r"corim: expected well-formed CBOR, found 68719476736 items at byte 3",
    ),
]


@pytest.mark.parametrize(
    ("make", "pattern"),
    [(m, p) for _, m, p in DOCUMENT_CASES],
    ids=[n for n, _, _ in DOCUMENT_CASES],
)
def test_document_format_errors_name_the_field(
    roots: SimGpuRoots, make: Callable[[SimGpuRoots], bytes], pattern: str
) -> None:
    with pytest.raises(RimFormatError, match=pattern):
        _load(roots, make(roots))


def test_oversize_is_refused_before_decoding(roots: SimGpuRoots) -> None:
    data = corim_sim.corim(roots, "driver", DRIVER)
    with pytest.raises(RimFormatError, match=rf"corim: expected at most {MAX_CORIM_BYTES} bytes"):
        _load(roots, data + bytes(MAX_CORIM_BYTES))


def test_naive_time_is_caller_misuse(roots: SimGpuRoots) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        load_corim(b"", roots=[roots.rim_root], at=datetime(2025, 1, 1))


def test_no_value_is_read_from_the_unprotected_header(roots: SimGpuRoots) -> None:
    """A corim-meta or payload placed in the unprotected header changes nothing read."""
    sign1 = _sign1(roots)
    other = corim_sim.corim_map("NV_GPU_DRIVER_GH100_999.99", [corim_sim.comid({2: (bytes(48),)})])
    sign1[1] = {8: cbor2.dumps({0: {0: "someone else"}}), 99: cbor2.dumps(other)}
    rim = _load(roots, cbor2.dumps(cbor2.CBORTag(502, sign1)), signer=[roots.rim_signer])
    assert rim.version == DRIVER
    assert isinstance(roots.rim_signer, x509.Certificate)
