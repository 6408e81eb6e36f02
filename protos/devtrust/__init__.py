"""devtrust: device trust and attestation for GPU fleets.

One import namespace over the repository's folders (pyproject.toml maps them):

- ``devtrust.core`` (``protos/devtrust/core``): what every side shares and nothing else;
- ``devtrust.v1`` (``protos/devtrust/v1``): the generated wire code, ``protos/`` is the proto root;
- ``devtrust.agent`` (``agent/``), ``devtrust.verifier`` (``verifier/``);
- ``devtrust.swtpm`` (``swtpm/``): software TPMs and the demo, outside the runtime packages.
"""

__version__ = "0.1.0"
