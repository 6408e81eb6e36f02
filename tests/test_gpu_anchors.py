"""What the verifier loads for GPU attestation (verifier/gpu/anchors.py): the RIM store's
golden values come from the NVIDIA-signed files, verified again against the RIM roots when
the verifier reads the store, never from its index alone (an index edited to let another
measurement pass changes nothing)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from devtrust.verifier.config import DEFAULT_RIM_ROOT, GpuConfig
from devtrust.verifier.gpu.anchors import GpuAnchorsHolder
from devtrust.verifier.gpu.rim_store import INDEX, RimStore
from devtrust.verifier.gpu.types import RimKind
from tests.corpus import corpus_root

DRIVER_RIM = corpus_root() / "gpu" / "nvidia_nvtrust_attestation" / "Driver_RIM_test_no_gpu.swidtag"
WHEN = datetime(2024, 6, 1, tzinfo=UTC)  # while NVIDIA's RIM signer was valid


def test_an_edited_index_does_not_change_the_golden_values_the_verifier_reads(
    tmp_path: Path,
) -> None:
    store = tmp_path / "rims"
    roots = x509.load_pem_x509_certificates(DEFAULT_RIM_ROOT.read_bytes())
    signed = RimStore.open(store).add(DRIVER_RIM.read_bytes(), roots=roots, at=WHEN)
    index = json.loads((store / INDEX).read_text())
    forged = "ab" * 48
    first = index["rims"][0]
    first["measurements"][0]["alternatives"] = [forged]
    (store / INDEX).write_text(json.dumps(index))
    # Read as an index alone, the forged value would be golden...
    unverified = RimStore.open(store).find(RimKind.DRIVER, "545.00")
    assert unverified is not None
    assert unverified.measurements[0].alternatives == (bytes.fromhex(forged),)
    # ...the verifier reads the signed file's values instead.
    rims = GpuAnchorsHolder(GpuConfig(rim_store=store)).current.rims
    read = rims.find(RimKind.DRIVER, "545.00")
    assert read is not None
    assert read.measurements == signed.measurements
