"""PostgreSQL URLs: recognised, checked before libpq sees them, and never shown with their password."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

from orchestrator.journal.errors import JournalURLError

#
# The dialect differences live here, in two small classes with one interface; the Journal's business logic is
# written once, in SQLite's dialect (`?` placeholders), and `_PostgresDB` translates it.

PG_SCHEMES = ("postgresql://", "postgres://")

# A URL in free text: its scheme, then everything up to the next white space. The password may hold any
# character (an unencoded "@", "/", ":" or "%" included), so the user information runs to the LAST "@".
_URL = re.compile(r"(?i)(?<![a-z0-9+.\-])(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<rest>\S*)")
_URL_SCHEME = re.compile(r"(?i)^[a-z][a-z0-9+.\-]*://")
# password=... in a URL's query or a libpq conninfo string (sslpassword= too): to the next "&" or white space,
# or a whole quoted value
_PASSWORD_PARAM = re.compile(r"(?i)(?P<head>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^&\s]*)")
_PERCENT_BAD = re.compile(r"%(?![0-9A-Fa-f]{2})")
MASK = "***"


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.lower().startswith(PG_SCHEMES)


def _redact_userinfo(m: re.Match[str]) -> str:
    rest = m["rest"]
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return m[0]
    user, colon, _password = userinfo.partition(":")
    if not colon and not re.search(r"[@/%]", userinfo):
        return m[0]  # a user name alone: nothing secret
    shown = f"{user}:{MASK}" if colon and not re.search(r"[@/%]", user) else MASK
    return f"{m['scheme']}{shown}@{host}"


def redact_url(text: str, passwords: Iterable[str] = ()) -> str:
    """THE redaction of rt-tune's messages, logs and artifacts: in every `scheme://...` URL of `text`,
    everything between the scheme and the last "@" (`user:***@`, or `***@` when the user name itself is
    unclear), every `password=` value, and each of `passwords` (known beforehand, see `url_secrets`) wherever
    it appears, become `***` (a password under 4 characters only inside URLs: elsewhere it would mask pieces
    of ordinary words)."""
    for secret in sorted({p for p in passwords if len(p) >= 4}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _PASSWORD_PARAM.sub(rf"\g<head>{MASK}", _URL.sub(_redact_userinfo, text))


def url_secrets(url: str) -> list[str]:
    """The password of `url` in every spelling a message may show it in: as written (between the first ":"
    after the scheme and the last "@"), percent-decoded, and libpq's reading (also `?password=`)."""
    found: list[str] = []
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    if ":" in userinfo:
        raw = userinfo.partition(":")[2]
        found += [raw, urllib.parse.unquote(raw)]
    for m in _PASSWORD_PARAM.finditer(url):
        raw = m[0][len(m["head"]):].strip("'")
        found += [raw, urllib.parse.unquote(raw)]
    if is_postgres_url(url):
        try:
            from psycopg.conninfo import conninfo_to_dict

            found.append(str(conninfo_to_dict(url).get("password") or ""))
        except Exception:  # noqa: BLE001 - a URL libpq cannot parse: check_db_url refuses it, redacted
            pass
    return [s for s in dict.fromkeys(found) if s]


def check_db_url(url: str) -> None:
    """Refuse a journal URL that libpq would read differently from what its author meant, before libpq sees
    it: libpq cuts the user information at the FIRST "@" (or "/"), so an unencoded "@" or "/" in a password
    turns the rest of it into a host, port or database name, which its errors then print. Also a "%" that is
    not a %XX escape (libpq's error quotes the text around it) and a scheme other than PostgreSQL's."""
    shown = redact_url(url, url_secrets(url))
    if url != url.strip() or not url.isprintable():
        raise JournalURLError(f"journal URL {shown!r}: white space or a control character around or in it: "
                              "give the URL alone")
    if not is_postgres_url(url):
        raise JournalURLError(f"journal URL {shown}: not a journal; give a postgresql:// (or postgres://) "
                              "URL or the path of a SQLite file")
    userinfo = url.partition("://")[2].rpartition("@")[0]
    encode = "leave the password out of the URL (libpq reads PGPASSWORD or ~/.pgpass), or percent-encode it"
    if re.search(r"[@/]", userinfo):
        raise JournalURLError(f"journal URL {shown}: its user name or password holds an unencoded \"@\" or "
                              "\"/\", which would cut it short and show the rest as a host or database "
                              f"name: {encode} (\"@\" as %40, \"/\" as %2F, \"%\" as %25)")
    if _PERCENT_BAD.search(url):
        raise JournalURLError(f"journal URL {shown}: a \"%\" that does not start a %XX escape: {encode} "
                              "(\"%\" as %25)")
