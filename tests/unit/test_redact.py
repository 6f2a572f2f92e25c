"""Issue #15 item 5: a journal URL's password never shows, whatever characters it holds.

`redact_url` is the one redaction function (messages, reprs, logs, artifacts); `check_db_url` refuses, before
libpq sees it, a URL libpq would cut at the first "@" or "/" of the password and then quote in its errors."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest

from orchestrator.journal.errors import JournalError, JournalURLError
from orchestrator.journal.journal import Journal
from orchestrator.journal.urls import check_db_url, redact_url, url_secrets
from tests.conftest import REPO

pytestmark = pytest.mark.unit

# distinctive passwords: none of their 3-character pieces appears in any message by chance
HOSTILE = [
    ("postgresql://tuner:QX7@ZJ9:KW/2%VY8@db.lan/j", "QX7@ZJ9:KW/2%VY8"),  # @ : / % unencoded
    ("postgresql://tuner:QX7@ZJ9@KW8@127.0.0.1:1/j", "QX7@ZJ9@KW8"),  # several @
    ("postgres://tuner:QX7/ZJ9KW8@127.0.0.1:1/j", "QX7/ZJ9KW8"),  # / alone: libpq would read "QX7" as a port
    ("postgresql://tuner:QX7%ZJ9KW8@127.0.0.1:1/j", "QX7%ZJ9KW8"),  # % not an escape
    ("postgresql://tu:QX7:ZJ9@KW8@[::1/j", "QX7:ZJ9@KW8"),  # : and @, a broken host after it
    ("postgresql://tuner@127.0.0.1:1/j?password=QX7%ZJ9KW8", "QX7%ZJ9KW8"),  # in the query, bad %
]


def pieces(secret: str, n: int = 3) -> set[str]:
    return {secret[i:i + n] for i in range(len(secret) - n + 1)}


def assert_hidden(text: str, secret: str) -> None:
    leaked = sorted(p for p in pieces(secret) if p in text)
    assert not leaked, f"pieces {leaked} of the password show in: {text}"


@pytest.mark.parametrize("text, expected", [
    ("postgresql://tuner:p@ss:w/rd%Secret9@host/db", "postgresql://tuner:***@host/db"),  # the example
    ("postgresql://u:a@b@c@d@h:5432/db", "postgresql://u:***@h:5432/db"),  # several @: up to the last
    ("x postgres://u:p/w@h/db y", "x postgres://u:***@h/db y"),
    ("postgresql://u:%zz@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),  # no password: nothing hidden
    ("postgresql://h/db", "postgresql://h/db"),  # no @ at all
    ("postgresql://u%40x:pw@h/db", "postgresql://***@h/db"),  # the user name itself unclear: all of it
    ("postgresql://p@ss@h/db", "postgresql://***@h/db"),  # no ":" but an "@" in it: could be a password
    ("postgresql://h/db?user=u&password=s3cret&sslmode=require",
     "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("postgresql://h/db?sslpassword=s3cret", "postgresql://h/db?sslpassword=***"),
    ("host=h password='a b c' dbname=j", "host=h password=*** dbname=j"),
    ("host=h PASSWORD = s3cret", "host=h PASSWORD = ***"),
    ("https://bot:ghp_token@github.com/x.git", "https://bot:***@github.com/x.git"),  # any scheme
    ('cannot open "postgresql://u:pw@h/db": refused', 'cannot open "postgresql://u:***@h/db": refused'),
    ("postgresql://u:***@h/db", "postgresql://u:***@h/db"),  # idempotent
])
def test_redact_url(text, expected):
    assert redact_url(text) == expected
    assert redact_url(expected) == expected


def test_known_passwords_are_hidden_anywhere_in_the_text():
    url = "postgresql://tuner:QX7@ZJ9:KW/2%VY8@db.lan/j"
    text = f'cannot open {url}: password "QX7@ZJ9:KW/2%VY8" (decoded "QX7@ZJ9:KW/2%VY8") refused'
    assert_hidden(redact_url(text, url_secrets(url)), "QX7@ZJ9:KW/2%VY8")
    encoded = "postgresql://tuner:QX7%40ZJ9KW8@db.lan/j"
    assert_hidden(redact_url("libpq: password QX7@ZJ9KW8 refused", url_secrets(encoded)), "QX7@ZJ9KW8")


def test_a_very_short_password_is_masked_in_urls_only():
    """Masking "p" everywhere would turn "postgresql" into "***ostgresql"; in the URL it is masked anyway."""
    assert redact_url("password p refused for postgresql://u:p@h/db", ["p"]) == \
        "password p refused for postgresql://u:***@h/db"


def test_url_secrets_spells_the_password_every_way():
    assert set(url_secrets("postgresql://u:p%40ss@h/db")) == {"p%40ss", "p@ss"}
    assert "QX7@ZJ9" in url_secrets("postgresql://u:QX7@ZJ9@h/db")
    assert set(url_secrets("postgresql://h/db?password=a%2Fb")) == {"a%2Fb", "a/b"}
    assert url_secrets("postgresql://u@h/db") == []


@pytest.mark.parametrize("url, secret", HOSTILE)
def test_a_url_libpq_would_misread_is_refused_before_libpq_sees_it(url, secret):
    with pytest.raises(JournalURLError) as info:
        Journal(url, connect_timeout_s=1)
    assert info.value.exit_code == 2
    text = "".join(traceback.format_exception(info.value))  # the chained causes too
    assert_hidden(text, secret)
    assert "percent-encode" in str(info.value) and "PGPASSWORD" in str(info.value)


@pytest.mark.parametrize("url", [
    "postgresql://u:p%40ss%2Fw%25rd@h/db",  # encoded as the message asks
    "postgresql://u:pa:ss@h:5432/db",  # ":" in a password: libpq splits at the first one, as we do
    "postgresql://u@h/db?sslmode=require",
    "postgres:///db",
])
def test_well_formed_urls_pass_the_check(url):
    check_db_url(url)


def test_another_scheme_is_refused_and_never_becomes_a_file(tmp_path):
    url = "postgressql://tuner:QX7ZJ9KW8@h/db"  # a typo
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(JournalURLError) as info:
            Journal(url)
    finally:
        os.chdir(cwd)
    assert_hidden(str(info.value), "QX7ZJ9KW8")
    assert list(tmp_path.iterdir()) == []  # no "postgressql:" directory, no SQLite file named after the URL


def test_psycopg_errors_are_redacted_for_a_well_formed_url():
    """A connection that fails (nothing listens on port 1): libpq's message, the repr and the chain."""
    url = "postgresql://tuner:QX7%40ZJ9KW8@127.0.0.1:1/j"
    with pytest.raises(JournalError) as info:
        Journal(url, connect_timeout_s=1)
    text = "".join(traceback.format_exception(info.value))
    assert "127.0.0.1" in text and "tuner:***@" in text
    for secret in ("QX7%40ZJ9KW8", "QX7@ZJ9KW8"):
        assert_hidden(text, secret)


@pytest.mark.parametrize("how", ["--db", "RT_TUNE_DB"])
@pytest.mark.parametrize("url, secret", HOSTILE[:4])
def test_the_cli_never_prints_the_password(tmp_path, how, url, secret):
    inv = tmp_path / "inventory.yaml"
    inv.write_text("units:\n  lab1:\n    host: {address: 127.0.0.1, port: 1}\n")
    env = {"RT_TUNE_STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    args = ["status", "-i", str(inv)]
    if how == "--db":
        args += ["--db", url]
    else:
        env["RT_TUNE_DB"] = url
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "journal URL postgres" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert_hidden(proc.stdout + proc.stderr, secret)
