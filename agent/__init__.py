"""The devtrust agent: collects TPM evidence on a host and streams it to the verifier."""
