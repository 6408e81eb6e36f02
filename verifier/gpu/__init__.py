"""GPU attestation for the verifier: NVIDIA SPDM reports, parsed and verified offline."""
