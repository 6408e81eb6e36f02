"""The devtrust agent: collects TPM evidence on a host and streams it to the verifier.

``agent.errors``, ``agent.configfile`` and ``agent.files`` are also used by the verifier:
they are the small layer every devtrust process shares.
"""

__version__ = "0.1.0"
