"""Which account mailward runs as: service.process_account for each way it can be started."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from mailward.config import Config, config_from_dict
from mailward.service import Account, StartupError, hand_over_state, process_account

LISTENERS = [{"kind": "mx", "address": "127.0.0.1", "port": 2525}]


def config(**top: Any) -> Config:
    return config_from_dict({"listener": LISTENERS, "state_dir": "/var/lib/mailward", **top}, "test")


def as_uid(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)


def test_root_without_user_is_refused_in_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    as_uid(monkeypatch, 0)
    with pytest.raises(StartupError) as err:
        process_account(config())
    message = str(err.value)
    assert message.startswith("mailward was started as root and the configuration sets no user")
    assert 'add user = "mailward"' in message and message.endswith(".") and "\n" not in message


def test_the_demo_may_stay_root(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    as_uid(monkeypatch, 0)
    with caplog.at_level(logging.WARNING, logger="mailward"):
        assert process_account(config(), demo=True) is None
    assert "the demo runs as root" in caplog.text


def test_an_unknown_user_says_how_to_create_it(monkeypatch: pytest.MonkeyPatch) -> None:
    as_uid(monkeypatch, 0)

    def missing(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", missing)
    with pytest.raises(StartupError) as err:
        process_account(config(user="mailward"))
    assert str(err.value) == (
        "user: no account named mailward exists on this system; create it with useradd --system --user-group "
        "--no-create-home --home-dir /var/lib/mailward --shell /usr/sbin/nologin mailward, or name an "
        "existing account.")


def test_a_known_user_is_the_account_to_drop_to(monkeypatch: pytest.MonkeyPatch) -> None:
    as_uid(monkeypatch, 0)
    entry = pwd.struct_passwd(("mailward", "x", 118, 125, "", "/var/lib/mailward", "/usr/sbin/nologin"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: entry)
    assert process_account(config(user="mailward")) == Account("mailward", 118, 125)


def test_user_root_keeps_root_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    as_uid(monkeypatch, 0)
    with caplog.at_level(logging.WARNING, logger="mailward"):
        assert process_account(config(user="root")) is None
    assert "user = root is root: mailward keeps every privilege" in caplog.text


def test_not_started_as_root_nothing_is_dropped(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    as_uid(monkeypatch, 4242)
    with caplog.at_level(logging.INFO, logger="mailward"):
        assert process_account(config()) is None
        assert "not started as root, so there is nothing to drop" in caplog.text
        caplog.clear()
        # `user` cannot be honoured without root; say so rather than fail a start that would work.
        assert process_account(config(user="mailward")) is None
    assert "user = mailward applies only when mailward is started as root; running as 4242" in caplog.text


@pytest.mark.parametrize("state_dir", ["/", "/var", "/srv/"])
def test_a_shared_directory_is_never_handed_over(state_dir: str) -> None:
    cfg = config(state_dir=state_dir, user="mailward")
    with pytest.raises(StartupError, match=r"too close to the root of the file system"):
        hand_over_state(cfg, Account("mailward", 118, 125))
    assert Path(state_dir).stat().st_uid != 118


@pytest.fixture
def as_nobody() -> Account:
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    pw = pwd.getpwnam("nobody")
    return Account("nobody", pw.pw_uid, pw.pw_gid)


def test_hand_over_gives_the_tree_but_follows_no_link(tmp_path: Path, as_nobody: Account) -> None:
    state = tmp_path / "state"
    (state / "queue").mkdir(parents=True)
    (state / "queue" / "queue.db").write_text("")
    (state / "users").write_text("")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("")
    (state / "link-to-dir").symlink_to(outside)
    (state / "link-to-file").symlink_to(outside / "secret")
    os.link(outside / "secret", state / "hard-link")
    # Maildir folders are given, the messages in them are not visited (there may be millions).
    message = state / "mail" / "alice" / "new" / "1.host"
    message.parent.mkdir(parents=True)
    message.write_text("")
    (state / "mail" / "new").mkdir()  # a local user named "new" is not a Maildir folder
    (state / "mail" / "new" / "queued").write_text("")

    hand_over_state(config(state_dir=str(state), user="nobody"), as_nobody)

    mine = (as_nobody.uid, as_nobody.gid)
    for path in ("", "queue", "queue/queue.db", "users", "mail", "mail/alice", "mail/alice/new", "mail/new",
                 "mail/new/queued"):
        st = (state / path).lstat()
        assert (st.st_uid, st.st_gid) == mine, path
    assert message.stat().st_uid == 0
    for path in (outside, outside / "secret", state / "link-to-dir", state / "link-to-file"):
        assert path.lstat().st_uid == 0, path


def test_hand_over_follows_a_symlinked_state_dir_once(tmp_path: Path, as_nobody: Account) -> None:
    real = tmp_path / "srv" / "mailward"
    (real / "queue").mkdir(parents=True)
    link = tmp_path / "state"
    link.symlink_to(real)
    hand_over_state(config(state_dir=str(link), user="nobody"), as_nobody)
    assert (real / "queue").stat().st_uid == as_nobody.uid and real.stat().st_uid == as_nobody.uid
    assert link.lstat().st_uid == 0
