"""What the agent, the verifier and a relying party share, and nothing else.

This package imports no other part of devtrust (tests/test_layers.py checks it), so that a
relying party can read a device certificate's claims and SPIFFE identity without the CA's
key, the agent without the verifier, and the verifier without the agent or a TPM library:

- ``errors``: the package's error base (STYLE 7);
- ``ids``: ``DeviceId``, ``Serial``, ``Nonce``;
- ``tier``: ``Tier`` and its one comparison, ``meets``;
- ``spiffe``: SPIFFE identities of devices, agents and operators;
- ``claims``: the device certificate's claims extension;
- ``binding``: what the quote, the enrollment proof and the key's proof of possession bind;
- ``files``: atomic writes; ``config``: the typed YAML loader; ``logsetup``: one log format.
"""
