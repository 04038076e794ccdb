"""Client channels with the options every caller wants: mTLS, quick reconnects, keepalive."""

from __future__ import annotations

import grpc

from siterecovery.common.grpcserver import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted server is found again within a few seconds, not minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

# Deadline for every control-plane RPC.
RPC_TIMEOUT = 10.0


def secure_channel(
    address: str, credentials: grpc.ChannelCredentials, *, target_name: str | None = None
) -> grpc.Channel:
    """`target_name` is the name checked against the server certificate.

    Our servers carry a fixed name (the configuration server's, or
    `<id>.siterecovery.internal` for an agent), so clients can reach them by any
    address: through NAT, by IP, or on 127.0.0.1 in the lab.
    """
    options = list(CHANNEL_OPTIONS)
    if target_name:
        options.append(("grpc.ssl_target_name_override", target_name))
    return grpc.secure_channel(address, credentials, options=options)
