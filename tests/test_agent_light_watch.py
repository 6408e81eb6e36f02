"""Issue 11, item 4: the posture watch with inotify. Real files in a host tree, a real event
loop and real inotify; the debounce runs on a clock the test moves, so what is asserted is
which notes went, never how fast. Waits have a generous limit that only guards against a
hang."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from devtrust.agent import inotify
from devtrust.agent.signals import WATCHED, pseudo
from devtrust.agent.watch import PostureWatcher
from devtrust.swtpm.hosttree import write_host_tree

HANG_S = 20.0
HARDENING = "etc/ssh/sshd_config.d/10-hardening.conf"
NEVER = 3600.0  # a poll interval that no test outlives: what is seen, inotify saw


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Notes:
    def __init__(self) -> None:
        self.got: list[list[str]] = []

    def __call__(self, signals: list[str]) -> None:
        self.got.append(signals)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition``; fail only past a limit far beyond any wait expected."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


Scenario = Callable[[PostureWatcher, Notes, Clock], Awaitable[None]]


def run(root: Path, scenario: Scenario, *, interval_s: float = NEVER, **kw: object) -> Notes:
    clock, notes = Clock(), Notes()

    async def main() -> None:
        watcher = PostureWatcher(
            root,
            interval_s=interval_s,
            debounce_s=0.05,
            clock=clock,
            **kw,  # type: ignore[arg-type]
        )
        unsubscribe = watcher.subscribe(notes)
        try:
            await asyncio.wait_for(watcher.ready.wait(), HANG_S)
            await scenario(watcher, notes, clock)
        finally:
            unsubscribe()
        await until(lambda: watcher.files is None, "the inotify watch closed")

    asyncio.run(main())
    return notes


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_host_tree(tmp_path / "host")


def test_one_note_per_debounce_window(root: Path) -> None:
    """The first edit goes at once; the edits after it, within the window, are held and
    go as one note when the window closes."""

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        assert watcher.files is not None
        (root / HARDENING).write_text("PermitRootLogin yes\n")
        await until(lambda: len(notes.got) == 1, "the first note")
        for n in range(5):
            (root / HARDENING).write_text(f"PermitRootLogin no\n# edit {n}\n")
        await until(lambda: watcher.held == {"sshd_config"}, "the later edits held")
        assert len(notes.got) == 1
        clock.now = 10.0  # the window closes
        await until(lambda: len(notes.got) == 2, "the held note")

    notes = run(root, scenario)
    assert notes.got == [["sshd_config"], ["sshd_config"]]


def test_a_file_replaced_by_rename_is_still_watched(root: Path) -> None:
    """Editors save by writing a new file and renaming it over the old one: the new file is
    the one watched afterwards."""
    config = root / "etc/ssh/sshd_config"

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        steps: list[Callable[[], object]] = [
            lambda: _replace(config, "Include /etc/ssh/sshd_config.d/*.conf\nPort 2222\n"),
            lambda: config.write_text("Include /etc/ssh/sshd_config.d/*.conf\nPort 2223\n"),
            lambda: _replace(config, "PermitRootLogin yes\n"),
            lambda: config.write_text("PermitRootLogin no\n"),
        ]
        for n, step in enumerate(steps, 1):
            clock.now += 10.0  # each change a first change
            step()
            await until(lambda n=n: len(notes.got) == n, f"step {n}")  # type: ignore[misc]

    assert run(root, scenario).got == [["sshd_config"]] * 4


def test_a_file_deleted_then_recreated(root: Path) -> None:
    config = root / "etc/ssh/sshd_config"
    drop_in = root / "etc/ssh/sshd_config.d"

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        steps: list[Callable[[], object]] = [
            config.unlink,
            lambda: config.write_text("PermitRootLogin yes\n"),
            lambda: shutil.rmtree(drop_in),
            drop_in.mkdir,
            # In a directory made after the watch started: watched through its parent.
            lambda: (drop_in / "20-new.conf").write_text("PasswordAuthentication yes\n"),
            lambda: (drop_in / "20-new.conf").write_text("PasswordAuthentication no\n"),
        ]
        for n, step in enumerate(steps, 1):
            clock.now += 10.0
            step()
            await until(lambda n=n: len(notes.got) == n, f"step {n}")  # type: ignore[misc]

    assert run(root, scenario).got == [["sshd_config"]] * 6


def test_a_symlinked_config_is_watched_through_its_target(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "managed" / "sshd_config"
    target.parent.mkdir()
    target.write_text("PermitRootLogin no\n")
    link = root / "etc/ssh/sshd_config"
    link.unlink()
    link.symlink_to(target)

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        target.write_text("PermitRootLogin yes\n")  # the link itself does not change
        await until(lambda: len(notes.got) == 1, "the target's change")

    assert run(root, scenario).got == [["sshd_config"]]


def test_a_directory_missing_at_start(tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        (root / "etc/ssh/sshd_config.d").mkdir(parents=True)
        (root / "etc/ssh/sshd_config.d/10.conf").write_text("PermitRootLogin yes\n")
        await until(lambda: notes.got != [], "the new configuration")

    assert run(root, scenario).got[0] == ["sshd_config"]


def test_pseudo_files_are_polled(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/proc and /sys give no inotify events: those signals are polled, the others are not."""
    assert sorted(s for s in WATCHED if not pseudo(s)) == ["sshd_config"]

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        (root / "proc/modules").write_text("evil 16384 0 - Live 0x0000000000000000 (OE)\n")
        await until(lambda: len(notes.got) == 1, "the module's note")

    with caplog.at_level(logging.INFO, logger="devtrust.agent.watch"):
        notes = run(root, scenario, interval_s=0.01)
    assert notes.got == [["kernel_modules"]]
    [line] = [r.getMessage() for r in caplog.records if "watching posture" in r.getMessage()]
    assert "inotify on sshd_config;" in line
    assert "polling every 0.01 s: kernel_modules, gpu_driver, listening_sockets" in line


def test_without_inotify_every_signal_is_polled(
    root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(self: inotify.Inotify) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(inotify.Inotify, "__init__", unavailable)

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        assert watcher.files is None
        (root / HARDENING).write_text("PermitRootLogin yes\n")
        await until(lambda: len(notes.got) == 1, "the polled note")

    with caplog.at_level(logging.INFO, logger="devtrust.agent.watch"):
        notes = run(root, scenario, interval_s=0.01)
    assert notes.got == [["sshd_config"]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "inotify unavailable (Too many open files): polling sshd_config every 0.01 s instead"
    ]


def test_the_inotify_descriptor_lives_while_someone_listens(root: Path) -> None:
    opened: list[int] = []
    real = inotify.Inotify.__init__

    def spy(self: inotify.Inotify) -> None:
        real(self)
        opened.append(self.fd)

    async def scenario(watcher: PostureWatcher, notes: Notes, clock: Clock) -> None:
        assert _kind(opened[0]) == "anon_inode:inotify"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inotify.Inotify, "__init__", spy)
        run(root, scenario)
    assert len(opened) == 1
    assert _kind(opened[0]) != "anon_inode:inotify"  # closed (or the number reused)


def _kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return "closed"


def _replace(path: Path, text: str) -> None:
    new = path.with_name(f".{path.name}.new")
    new.write_text(text)
    os.replace(new, path)
