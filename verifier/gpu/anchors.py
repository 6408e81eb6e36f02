"""What the verifier checks GPU reports against, read from its configuration (``gpu:`` in
verifier.yaml): the roots of GPU identity certificates, the RIM store, the operator's CRLs
and OCSP responses. Read at start and again on reload (SIGHUP), never while appraising; a
reload that fails keeps what was in force.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from cryptography import x509

from devtrust.core.errors import ConfigError
from devtrust.verifier.config import GpuConfig
from devtrust.verifier.gpu.appraise import GpuAnchors
from devtrust.verifier.gpu.revocation import Revocations
from devtrust.verifier.gpu.rim_store import RimStore

logger = logging.getLogger(__name__)

# A roots directory holds at most this many files (a mistyped path such as /etc is refused,
# not read whole).
MAX_ROOT_FILES = 256


def load_roots(paths: list[Path], *, what: str) -> tuple[x509.Certificate, ...]:
    """The PEM certificates of ``paths`` (files, or directories of .pem/.crt files):
    ConfigError naming the file that is missing or holds no certificate."""
    roots: list[x509.Certificate] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".crt"))
            if len(files) > MAX_ROOT_FILES:
                raise ConfigError(
                    f"gpu.{what}: {path} holds {len(files)} certificate files, more than "
                    f"{MAX_ROOT_FILES}: give the roots' own directory"
                )
        else:
            files = [path]
        for file in files:
            try:
                certs = x509.load_pem_x509_certificates(file.read_bytes())
            except OSError as exc:
                raise ConfigError(f"gpu.{what}: cannot read {file}: {exc.strerror}") from None
            except ValueError:
                raise ConfigError(
                    f"gpu.{what}: {file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                ) from None
            roots.extend(certs)
    if not roots:
        raise ConfigError(f"gpu.{what}: no root certificate in {', '.join(map(str, paths))}")
    return tuple(roots)


class GpuAnchorsHolder:
    """The GPU anchors in force; ``reload`` replaces them only with a whole new set."""

    def __init__(self, config: GpuConfig) -> None:
        self.config = config
        self.current: GpuAnchors = self._load()

    def reload(self) -> GpuAnchors:
        """Read roots, RIM store and revocation data again (ConfigError keeps the old)."""
        self.current = self._load()
        return self.current

    def _load(self) -> GpuAnchors:
        config = self.config
        roots = load_roots(config.device_roots, what="device_roots")
        # Each stored RIM verified again against the RIM roots (at the time it was added):
        # the golden values always come from a file NVIDIA's root signed, whatever happened
        # to the store's index since (~20 ms per RIM, at start and reload only).
        rim_roots = load_roots(config.rim_roots, what="rim_roots")
        store = RimStore.open(config.rim_store, roots=rim_roots)
        revocation = None
        if config.revocation is not None:
            # A file that is not a CRL or OCSP response is logged and left out; the others
            # count (strict, one bad file would keep every new revocation out on reload).
            revocation = Revocations.load(config.revocation, strict=False)
        anchors = GpuAnchors(
            device_roots=roots,
            rims=store,
            revocation=revocation,
            revocation_max_age=datetime.timedelta(seconds=config.revocation_max_age_s),
        )
        logger.info(
            "GPU attestation: %d device root(s), RIM store %s, revocation %s",
            len(roots),
            config.rim_store,
            config.revocation or "none (revocation unknown)",
        )
        return anchors
