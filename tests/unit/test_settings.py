from pathlib import Path

import pytest

from siterecovery.agents.settings import MasterTargetSettings, SourceSettings
from siterecovery.common import errors, settings
from siterecovery.controller.settings import ConfigServerSettings


def test_toml_then_flags(tmp_path):
    path = tmp_path / "cs.toml"
    path.write_text('state_dir = "/srv/cs"\nport = 4443\nadvertise = ["cs.example"]\n')
    cfg = settings.load(ConfigServerSettings, path, {"port": 0, "listen": None})
    assert cfg.state_dir == Path("/srv/cs")
    assert cfg.port == 0
    assert cfg.advertise == ("cs.example",)
    assert cfg.listen == "0.0.0.0"
    assert cfg.resolved_store_url == "sqlite:////srv/cs/store.db"


def test_unknown_key_is_an_error_naming_the_known_ones(tmp_path):
    path = tmp_path / "cs.toml"
    path.write_text("prot = 443\n")
    with pytest.raises(errors.InvalidInput) as caught:
        settings.load(ConfigServerSettings, path)
    assert "prot" in caught.value.message
    assert "port" in caught.value.hint


def test_wrong_type_and_range_are_errors(tmp_path):
    with pytest.raises(errors.InvalidInput):
        settings.load(ConfigServerSettings, None, {"port": "https"})
    with pytest.raises(errors.InvalidInput):
        settings.load(ConfigServerSettings, None, {"port": 70000})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(errors.InvalidInput, match="does not exist"):
        settings.load(ConfigServerSettings, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(errors.InvalidInput, match="not valid TOML"):
        settings.load(ConfigServerSettings, bad)


def test_agent_needs_a_server_and_takes_disk_tables(tmp_path):
    with pytest.raises(errors.InvalidInput, match="no configuration server"):
        settings.load(SourceSettings, None, {})
    path = tmp_path / "src.toml"
    path.write_text('server = "cs:443"\n[[disks]]\npath = "/dev/sdb"\nname = "data"\n')
    cfg = settings.load(SourceSettings, path)
    assert cfg.disks[0].path == Path("/dev/sdb") and cfg.disks[0].name == "data"


def test_master_target_defaults_live_under_state_dir():
    cfg = settings.load(MasterTargetSettings, None, {"server": "cs:443", "state_dir": "/srv/mt"})
    assert cfg.resolved_datastore_dirs == (Path("/srv/mt/datastore"),)
    assert cfg.resolved_retention_dir == Path("/srv/mt/retention")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cs", ("cs", 443)), ("cs:8443", ("cs", 8443)), ("[::1]:9", ("::1", 9)), ("127.0.0.1:0", ("127.0.0.1", 0))],
)
def test_parse_endpoint(text, expected):
    assert settings.parse_endpoint(text, default_port=443) == expected
