"""Pure TPM 2.0 structure handling for the verifier: parsing with ``struct``, no I/O."""
