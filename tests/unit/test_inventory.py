from pathlib import Path

from siterecovery.common.inventory import DirectorySizes, DiskIdentities, directory_facts, space_problems
from siterecovery.common.pb import common_pb2
from tests.tmpfs import tmpfs

GIB = 1024**3


def facts(free: int, total: int = 100 * GIB) -> common_pb2.DirectoryFacts:
    return common_pb2.DirectoryFacts(
        kind=common_pb2.DIRECTORY_KIND_RETENTION, path="/r", total_bytes=total, free_bytes=free
    )


def test_enough_space_is_no_problem():
    assert space_problems([facts(50 * GIB)]) == []


def test_low_space_warns_then_goes_critical_and_says_what_to_do():
    assert space_problems([facts(15 * GIB)]) == []
    (warning,) = space_problems([facts(14 * GIB)])
    assert warning.severity == common_pb2.SEVERITY_WARNING
    assert "retention directory /r has 14% free" in warning.message
    (critical,) = space_problems([facts(4 * GIB)])
    assert critical.severity == common_pb2.SEVERITY_CRITICAL


def test_a_low_state_directory_is_named_as_such():
    state = common_pb2.DirectoryFacts(kind=common_pb2.DIRECTORY_KIND_STATE, path="/var/lib/sr", total_bytes=100,
                                      free_bytes=7)
    (warning,) = space_problems([state])
    assert warning.code == "low-free-space" and "state directory /var/lib/sr has 7% free" in warning.message


def test_image_file_identity_is_stable_and_per_file(tmp_path: Path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"\0")
    b.write_bytes(b"\0")
    ids = DiskIdentities(tmp_path / "state")
    first = ids.identity(a)
    assert ids.identity(a) == first
    assert DiskIdentities(tmp_path / "state").identity(a) == first  # survives a restart
    assert ids.identity(b) != first


def test_a_directory_is_walked_again_only_once_its_size_is_old_but_free_space_is_read_every_time(tmp_path: Path):
    with tmpfs(tmp_path / "vol", "8M", "free-space reading") as volume:
        now = [100.0]
        sizes = DirectorySizes(max_age=60.0, clock=lambda: now[0])
        (volume / "a").write_bytes(b"x" * 1024 * 1024)
        first = directory_facts(common_pb2.DIRECTORY_KIND_RETENTION, volume, sizes=sizes)
        assert first.used_by_agent_bytes == 1024 * 1024

        (volume / "b").write_bytes(b"y" * 2 * 1024 * 1024)
        now[0] += 59.0
        cached = directory_facts(common_pb2.DIRECTORY_KIND_RETENTION, volume, sizes=sizes)
        assert cached.used_by_agent_bytes == 1024 * 1024  # not walked again yet
        assert cached.free_bytes == first.free_bytes - 2 * 1024 * 1024  # but free space is live

        now[0] += 1.0
        walked = directory_facts(common_pb2.DIRECTORY_KIND_RETENTION, volume, sizes=sizes)
        assert walked.used_by_agent_bytes == 3 * 1024 * 1024
