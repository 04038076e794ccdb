"""The `srctl` console script: the environment gRPC must see before it is imported, then srctl.

gRPC's C core logs a failed TLS handshake itself, on stderr, in its own format;
srctl reports every failure as one line and a hint, so the core logs errors
only (unless GRPC_VERBOSITY says otherwise). The core reads the variable when
grpc is imported, hence this module, which imports nothing of grpc's.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from siterecovery.controller.cli.main import main as srctl

    srctl()


if __name__ == "__main__":
    main()
