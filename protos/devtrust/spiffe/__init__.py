"""The SPIFFE Workload API, generated from workload.proto (``python -m protos.generate``)."""
