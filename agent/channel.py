"""gRPC channels to the verifier: TLS for enrollment, mTLS for attestation."""

from __future__ import annotations

import grpc

from agent.config import AgentConfig


def _options(cfg: AgentConfig) -> list[tuple[str, str | int]]:
    opts: list[tuple[str, str | int]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]
    if cfg.verifier.server_name:
        opts.append(("grpc.ssl_target_name_override", cfg.verifier.server_name))
    return opts


def enrollment_channel(cfg: AgentConfig, ca_pem: bytes) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(cfg.verifier.enrollment, creds, options=_options(cfg))


def attestation_channel(
    cfg: AgentConfig, *, ca_pem: bytes, key_pem: bytes, cert_pem: bytes
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(cfg.verifier.attestation, creds, options=_options(cfg))
