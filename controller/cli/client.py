"""How srctl finds and talks to the configuration server.

A profile is a small TOML file the configuration server writes for its local
administrator (`<state_dir>/admin/srctl.toml`): the address, and the CA,
certificate and key to authenticate with, relative to the file. srctl looks
for one in this order: --config, $SRCTL_CONFIG, the lab's (in $SRCTL_LAB_DIR
when set, as `srctl lab` itself resolves it: `lab_dir`), the configuration
server's default state directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import grpc

from siterecovery.common import errors
from siterecovery.common.channels import secure_channel
from siterecovery.common.pb import admin_pb2_grpc, protection_pb2_grpc
from siterecovery.common.pki import CONFIG_SERVER_NAME
from siterecovery.controller.settings import DEFAULT_STATE_DIR

LAB_DIR_ENV = "SRCTL_LAB_DIR"


def default_lab_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "siterecovery" / "lab"


def lab_dir(directory: Path | None = None) -> Path:
    """Where the lab lives: `directory` (`srctl lab --dir`), else $SRCTL_LAB_DIR, else the default.

    The one resolution for `srctl lab`, `srctl drill` and the profile lookup, so
    a lab started in $SRCTL_LAB_DIR is the one every other command talks to."""
    chosen = directory or (Path(os.environ[LAB_DIR_ENV]) if os.environ.get(LAB_DIR_ENV) else default_lab_dir())
    return chosen.expanduser().resolve()


def lab_profile(lab_dir: Path) -> Path:
    return lab_dir / "config-server" / "admin" / "srctl.toml"


def lab_of_profile(profile: Path) -> Path | None:
    """The lab directory whose admin profile `profile` is, or None for any other profile."""
    lab = profile.parent.parent.parent
    return lab if profile == lab_profile(lab) else None


def candidate_profiles(explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit]
    if os.environ.get("SRCTL_CONFIG"):
        return [Path(os.environ["SRCTL_CONFIG"])]
    return [lab_profile(lab_dir()), DEFAULT_STATE_DIR / "admin" / "srctl.toml"]


@dataclass(frozen=True)
class Profile:
    path: Path
    server: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def find(cls, explicit: Path | None = None) -> Profile:
        candidates = candidate_profiles(explicit)
        for path in candidates:
            if path.is_file():
                return cls.load(path)
        raise errors.NotFound(
            "no srctl profile found (looked at " + ", ".join(str(p) for p in candidates) + ")",
            hint="pass --config with the srctl.toml in the configuration server's admin/ folder, "
            "or start a lab with `srctl lab up`",
            code="profile-missing",
        )

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            data = tomllib.loads(path.read_text())
            base = path.parent
            return cls(
                path=path,
                server=data["server"],
                ca_pem=(base / data["ca"]).read_bytes(),
                cert_pem=(base / data["cert"]).read_bytes(),
                key_pem=(base / data["key"]).read_bytes(),
            )
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise errors.InvalidInput(
                f"srctl profile {path} is unreadable: {exc}",
                hint="it is written by the configuration server into <state_dir>/admin/",
                code="profile-invalid",
            ) from exc

    def channel(self) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )
        return secure_channel(self.server, credentials, target_name=CONFIG_SERVER_NAME)

    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel())

    def protection(self) -> protection_pb2_grpc.ProtectionStub:
        return protection_pb2_grpc.ProtectionStub(self.channel())
