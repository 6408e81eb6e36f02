"""Real software TPMs for tests, the demo and simulation.

``EndorsementCA`` makes a local endorsement CA per run; ``provision`` runs
``swtpm_setup --tpm2 --create-ek-cert`` against it; ``Swtpm`` starts ``swtpm socket`` on a
pair of loopback ports it binds itself (no race for a free port), probes readiness and stops
by pid. The TCTI string for tpm2-pytss is ``Swtpm.tcti``.

This package drives both sides (``demo``, ``devtrust-demo``, runs a verifier and an agent);
nothing that runs in production imports it (tests/test_layers.py).
"""

from devtrust.swtpm.localca import EndorsementCA
from devtrust.swtpm.process import Swtpm, SwtpmError, provision, swtpm_available

__all__ = ["EndorsementCA", "Swtpm", "SwtpmError", "provision", "swtpm_available"]
