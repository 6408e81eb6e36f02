"""``firewall_active`` for an agent that is not root (review 13b, M5): x_tables makes
/proc/net/ip_tables_names 0440 root, so devtrust-agent cannot read it; nf_tables loaded then
still says a firewall is there, instead of the field going unknown on every host under the
unit. The test runs as root (CI), so the refusal is the kernel's answer played back."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtrust.agent.posture import collect_posture
from devtrust.swtpm.hosttree import write_host_tree

TABLES = "proc/net/ip_tables_names"


@pytest.fixture
def unreadable_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading ip_tables_names fails as it does for a non-root user (EACCES)."""
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self.as_posix().endswith(TABLES):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)


@pytest.mark.usefixtures("unreadable_tables")
def test_unreadable_tables_fall_back_to_nf_tables(tmp_path: Path) -> None:
    root = write_host_tree(tmp_path / "host")
    (root / TABLES).write_text("filter\n")
    (root / "proc/modules").write_text("nf_tables 1 0 - Live 0x0\n")
    assert collect_posture(root).firewall_active is True


@pytest.mark.usefixtures("unreadable_tables")
def test_unreadable_tables_without_nf_tables_is_unknown(tmp_path: Path) -> None:
    """Legacy tables may be there unseen: unknown, with why, never "off"."""
    root = write_host_tree(tmp_path / "host")
    (root / TABLES).write_text("filter\n")
    (root / "proc/modules").write_text("ext4 1 0 - Live 0x0\n")
    posture = collect_posture(root)
    assert not posture.HasField("firewall_active")
    (why,) = [u.detail for u in posture.unavailable if u.field == "firewall_active"]
    assert why == f"/{TABLES}: Permission denied, and nf_tables not loaded"
