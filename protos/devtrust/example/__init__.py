"""An example relying party: ``python -m devtrust.example.registry``, a gRPC model registry
that serves model files only to devices of the zones and tier it allows (issue 10, item 7).

It imports only ``devtrust.core``, ``devtrust.gate``, its own generated code
(``registry_pb2``, from registry.proto by ``python -m protos.generate``), grpc and cryptography
(tests/test_layers.py): what a service of its own would need to gate on device trust.
"""
