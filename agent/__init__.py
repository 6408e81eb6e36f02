"""The devtrust agent: collects TPM evidence on a host and streams it to the verifier.

It imports ``devtrust.core``, never the verifier or the swtpm harness (tests/test_layers.py).
"""
