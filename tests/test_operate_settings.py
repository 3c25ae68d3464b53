"""How `trellis run` resolves the tree file's operating settings and its flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from trellis._operate import OperationsError, operations, parse_tokens

TOKEN = "0123456789abcdef"


def test_defaults_journal_metrics_and_a_socket_named_after_the_tree(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(tmp_path / "state"))
    ops = operations("shop", {}, environ={})
    assert ops.journal_url == f"sqlite:///{tmp_path}/state/shop.journal.db"
    assert (tmp_path / "state").is_dir()
    assert ops.socket is not None
    assert ops.socket.endswith("/shop.sock")
    assert (ops.tcp, ops.tokens, ops.metrics) == (None, {}, True)


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    settings = {
        "node": "n1",
        "journal": {"url": f"sqlite:///{tmp_path}/file.db", "batch_size": 7},
        "control": {"socket": f"{tmp_path}/file.sock"},
        "metrics": {"enabled": True},
    }
    ops = operations(
        "t",
        settings,
        journal=f"sqlite:///{tmp_path}/flag.db",
        socket_path="/x.sock",
        metrics=False,
        node="n2",
        environ={},
    )
    assert (ops.journal_url, ops.socket, ops.metrics, ops.node) == (
        f"sqlite:///{tmp_path}/flag.db",
        "/x.sock",
        False,
        "n2",
    )
    assert ops.journal_options == {"batch_size": 7}


def test_everything_off() -> None:
    ops = operations(
        "t",
        {"control": {"tcp": ("127.0.0.1", 9100)}},
        journal=False,
        control=False,
        metrics=False,
        environ={},
    )
    assert (ops.journal_url, ops.socket, ops.tcp, ops.metrics) == (None, None, None, False)
    assert ops.extensions()[1:] == []  # only the tracker


def test_disabled_in_the_file() -> None:
    settings = {
        "journal": {"enabled": False},
        "control": {"enabled": False, "tcp": ("127.0.0.1", 9100)},
        "metrics": {"enabled": False},
    }
    ops = operations("t", settings, environ={})
    assert (ops.journal_url, ops.socket, ops.tcp, ops.metrics) == (None, None, None, False)
    # an explicit --tcp still serves (and so needs its token)
    ops = operations(
        "t", settings, tcp=("127.0.0.1", 9101), environ={"TRELLIS_CONTROL_TOKEN": TOKEN}
    )
    assert (ops.socket, ops.tcp, ops.tokens) == (None, ("127.0.0.1", 9101), {"default": TOKEN})


def test_tcp_needs_a_token_from_the_named_variable() -> None:
    settings = {"control": {"tcp": ("127.0.0.1", 9100), "token_env": "SHOP_TOKEN"}}
    with pytest.raises(OperationsError, match="set SHOP_TOKEN"):
        operations("t", settings, environ={"TRELLIS_CONTROL_TOKEN": TOKEN})
    ops = operations("t", settings, environ={"SHOP_TOKEN": f"ops:{TOKEN},ci:{TOKEN[::-1]}"})
    assert ops.tokens == {"ops": TOKEN, "ci": TOKEN[::-1]}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("short", "at least 16 characters"),
        (f":{TOKEN}", "at least 16 characters"),
        (" , ", "no token given"),
    ],
)
def test_bad_tokens_name_the_variable(value: str, message: str) -> None:
    with pytest.raises(OperationsError, match=f"MY_VAR: .*{message}"):
        parse_tokens(value, "MY_VAR")


def test_journal_key_from_the_environment(tmp_path: Path) -> None:
    settings = {"journal": {"url": f"sqlite:///{tmp_path}/j.db", "key_env": "JKEY"}}
    with pytest.raises(OperationsError, match=r"journal\.key_env: environment variable JKEY"):
        operations("t", settings, environ={})
    ops = operations("t", settings, environ={"JKEY": "s3cret"})
    assert ops.journal_options == {"key": "s3cret"}


def test_a_journal_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OperationsError, match="journal: cannot create"):
        operations("t", {}, journal=f"sqlite:///{tmp_path}/file/sub/j.db", environ={})
