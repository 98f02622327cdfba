"""SMTP AUTH for mailward: SASL exchanges, the user store, and failed-login throttling.

This module owns who may log in and as which sender addresses. The SASL mechanisms (PLAIN,
RFC 4616; LOGIN, draft-murchison-sasl-login) are sans-IO: they take and return decoded bytes and
leave base64 and 334 replies to the SMTP engine. Passwords are stored as argon2id hashes made and
checked by argon2-cffi; no hashing is written here. The throttle is pure: the caller passes the
time and sleeps.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import tempfile
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import idna
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "MECHANISMS",
    "AuthThrottle",
    "Challenge",
    "Credentials",
    "SaslExchange",
    "SaslFailure",
    "SaslStep",
    "UnsupportedMechanism",
    "UserRecord",
    "UserStore",
    "UserStoreError",
    "default_hasher",
    "start_exchange",
]

log = logging.getLogger("mailward.auth")

MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")
# RFC 4616 requires accepting 255 octets per field; more is allowed, but a cap keeps a hostile
# client from making us normalise and hash megabytes.
MAX_FIELD_OCTETS = 1024


# --- SASL ------------------------------------------------------------------------------------


class UnsupportedMechanism(Exception):
    """The client asked for a SASL mechanism this server does not offer."""


@dataclass(frozen=True)
class Challenge:
    """Send `data` to the client (the engine base64-encodes it into a 334 reply)."""

    data: bytes


@dataclass(frozen=True)
class Credentials:
    """The exchange is complete; check these against the user store."""

    authzid: str
    authcid: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class SaslFailure:
    """The client's data was malformed or not allowed; answer 535/501 and log the reason."""

    reason: str


SaslStep = Challenge | Credentials | SaslFailure


class _Malformed(Exception):
    pass


class SaslExchange(ABC):
    """One AUTH exchange on the server side.

    Call `step(None)` first: it uses the initial response, if the AUTH command carried one, or
    returns the first challenge. Then call `step(data)` with each decoded client answer until it
    returns Credentials or SaslFailure. A client's "*" cancel is the engine's to handle.
    """

    mechanism: str

    def __init__(self, initial_response: bytes | None) -> None:
        self._initial_response = initial_response
        self._started = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def step(self, client_data: bytes | None) -> SaslStep:
        if self._done:
            raise RuntimeError(f"the {self.mechanism} exchange has already finished")
        try:
            if not self._started:
                if client_data is not None:
                    raise RuntimeError("the first step of a SASL exchange takes None")
                self._started = True
                result = self._begin(self._initial_response)
            elif client_data is None:
                result = SaslFailure("the client sent no response to the challenge")
            else:
                result = self._respond(client_data)
        except _Malformed as exc:
            result = SaslFailure(str(exc))
        if not isinstance(result, Challenge):
            self._done = True
        return result

    @abstractmethod
    def _begin(self, initial_response: bytes | None) -> SaslStep: ...

    @abstractmethod
    def _respond(self, client_data: bytes) -> SaslStep: ...


class PlainExchange(SaslExchange):
    """RFC 4616: one message `[authzid] NUL authcid NUL passwd`."""

    mechanism = "PLAIN"

    def _begin(self, initial_response: bytes | None) -> SaslStep:
        if initial_response is None:
            return Challenge(b"")
        return self._respond(initial_response)

    def _respond(self, client_data: bytes) -> SaslStep:
        parts = client_data.split(b"\x00")
        if len(parts) != 3:
            raise _Malformed("PLAIN message must be authzid NUL authcid NUL password")
        authzid = _sasl_text(parts[0], "authorization identity")
        authcid = _sasl_text(parts[1], "authentication identity")
        password = _sasl_text(parts[2], "password")
        if not authcid:
            raise _Malformed("empty authentication identity")
        if not password:
            raise _Malformed("empty password")
        # Logging in as someone else (proxy authorization) is not offered.
        if authzid and authzid.casefold() != authcid.casefold():
            raise _Malformed("authorization identity differs from the authentication identity")
        return Credentials(authzid=authzid, authcid=authcid, password=password)


class LoginExchange(SaslExchange):
    """draft-murchison-sasl-login: username and password in answer to two prompts.

    An initial response, which some clients send, is the username.
    """

    mechanism = "LOGIN"
    USERNAME_PROMPT = b"Username:"
    PASSWORD_PROMPT = b"Password:"

    def __init__(self, initial_response: bytes | None) -> None:
        super().__init__(initial_response)
        self._username: str | None = None

    def _begin(self, initial_response: bytes | None) -> SaslStep:
        if initial_response is None:
            return Challenge(self.USERNAME_PROMPT)
        return self._respond(initial_response)

    def _respond(self, client_data: bytes) -> SaslStep:
        if self._username is None:
            username = _sasl_text(client_data, "username")
            if not username:
                raise _Malformed("empty authentication identity")
            self._username = username
            return Challenge(self.PASSWORD_PROMPT)
        password = _sasl_text(client_data, "password")
        if not password:
            raise _Malformed("empty password")
        return Credentials(authzid="", authcid=self._username, password=password)


_EXCHANGES: dict[str, Callable[[bytes | None], SaslExchange]] = {
    "PLAIN": PlainExchange,
    "LOGIN": LoginExchange,
}


def start_exchange(mechanism: str, initial_response: bytes | None) -> SaslExchange:
    """Begin an AUTH exchange; `initial_response` is already decoded ("=" arrives as b"")."""
    factory = _EXCHANGES.get(mechanism.upper())
    if factory is None:
        raise UnsupportedMechanism(mechanism)
    return factory(initial_response)


def _sasl_text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_FIELD_OCTETS:
        raise _Malformed(f"{what} longer than {MAX_FIELD_OCTETS} octets")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{what} is not UTF-8") from None
    # A light SASLprep (RFC 4013): one normal form, no control characters.
    text = unicodedata.normalize("NFC", text)
    if _has_control(text):
        raise _Malformed(f"{what} contains a control character")
    return text


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


# --- user store ------------------------------------------------------------------------------


class UserStoreError(Exception):
    """The user file cannot be used or changed; the message says which file, line and fix."""


@dataclass(frozen=True)
class UserRecord:
    """One login: lower-case name, argon2id hash, and the sender addresses it may use."""

    name: str
    password_hash: str = field(repr=False)
    addresses: tuple[str, ...] = ()


def default_hasher() -> PasswordHasher:
    """argon2id at OWASP's 19 MiB / 2 passes / 1 lane.

    One lane because concurrency comes from many sessions verifying at once, each in its own
    thread; the modest memory keeps a burst of AUTH attempts from exhausting RAM.
    """
    return PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


_FILE_HEADER = "# mailward users: name:argon2id-hash:address,address (rewritten by `mailward user`)\n"

VERIFIED_TTL = 300.0  # seconds a verified password is remembered
VERIFIED_MAX = 4096  # logins remembered at once; the least recently verified go first


class _VerifiedLogins:
    """Passwords verified in the last VERIFIED_TTL seconds, so a client that connects once per
    message pays argon2 (tens of ms of CPU) once, not on every connection; saslauthd's credential
    cache (-c) and Dovecot's auth_cache do the same.

    Only successes are kept, as HMAC-SHA256 digests under a key made at start-up, never the
    passwords. A wrong password always costs the full argon2 check, and the stored hash is part
    of the digest: a changed password or a removed user stops matching at once.
    """

    def __init__(self, ttl: float = VERIFIED_TTL, size: int = VERIFIED_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = secrets.token_bytes(32)
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def _digest(self, record: UserRecord, password: str) -> bytes:
        # Neither the name nor the hash contains NUL, so the password is what follows the second.
        text = f"{record.name}\0{record.password_hash}\0{password}".encode("utf-8", "surrogatepass")
        return hmac.digest(self._key, text, hashlib.sha256)

    def known(self, record: UserRecord, password: str) -> bool:
        digest = self._digest(record, password)
        with self._lock:
            expiry = self._expiry.get(digest)
            if expiry is None:
                return False
            if expiry <= self._clock():
                del self._expiry[digest]
                return False
            return True

    def remember(self, record: UserRecord, password: str) -> None:
        digest = self._digest(record, password)
        with self._lock:
            self._expiry[digest] = self._clock() + self._ttl
            self._expiry.move_to_end(digest)
            while len(self._expiry) > self._size:
                self._expiry.popitem(last=False)


class UserStore:
    """The users file: one `name:argon2id-hash:addr1,addr2` per line, `#` comments.

    Safe to share between threads. Re-read whenever the file changes on disk, so a user added by
    another process counts at the next login; rewritten atomically with mode 0600 (comments are
    not kept). A missing file means no users.
    """

    def __init__(self, path: Path, *, hasher: PasswordHasher | None = None,
                 verified_ttl: float = VERIFIED_TTL) -> None:
        self._path = path
        self._hasher = hasher if hasher is not None else default_hasher()
        self._lock = threading.RLock()
        self._users: dict[str, UserRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        # Unknown names are checked against this so that the reply time does not reveal them.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(18))
        # None: every login pays the full argon2 check (auth.verified_cache_seconds = 0).
        self._verified = _VerifiedLogins(verified_ttl) if verified_ttl > 0 else None

    @property
    def path(self) -> Path:
        return self._path

    # reading

    def get(self, name: str) -> UserRecord | None:
        try:
            key = _user_key(name)
        except ValueError:
            return None
        with self._lock:
            self._refresh()
            return self._users.get(key)

    def list(self) -> builtins.list[UserRecord]:
        with self._lock:
            self._refresh()
            return sorted(self._users.values(), key=lambda record: record.name)

    def verify(self, name: str, password: str) -> UserRecord | None:
        """The user if the password is right, else None. Blocking (argon2): call from a thread.

        Raises UserStoreError if the file has become unreadable or malformed: refusing every
        login (454, and the error logged) is safer than trusting a half-edited file.
        """
        record = self.get(name)
        password = unicodedata.normalize("NFC", password)
        if record is None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(self._dummy_hash, password)
            return None
        if self._verified is not None and self._verified.known(record, password):
            return record
        try:
            self._hasher.verify(record.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        if self._hasher.check_needs_rehash(record.password_hash):
            self._rehash(record, password)
        elif self._verified is not None:
            self._verified.remember(record, password)
        return record

    def verify_cached(self, name: str, password: str) -> UserRecord | None:
        """The user if this password was verified within the cache's lifetime, else None (then
        `verify` decides). Cheap (one HMAC), so it runs on the event loop; only a correct
        password can match, so it tells nothing about wrong ones or unknown users."""
        if self._verified is None:
            return None
        record = self.get(name)
        if record is None:
            return None
        password = unicodedata.normalize("NFC", password)
        return record if self._verified.known(record, password) else None

    def may_send_as(self, user: UserRecord | str, address: str) -> bool:
        """Whether `user` may use `address` as envelope sender (or From).

        Domains compare case-insensitively (and IDNA-normalised); local parts exactly, except
        against the login name itself, which is case-insensitive by definition. The null sender
        is the caller's decision and is refused here.
        """
        record = self.get(user) if isinstance(user, str) else user
        if record is None:
            return False
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return False
        domain = _domain_key(domain)
        if not record.addresses:
            name_local, name_at, name_domain = record.name.rpartition("@")
            return bool(name_at) and local.lower() == name_local and domain == _domain_key(name_domain)
        for entry in record.addresses:
            entry_local, _, entry_domain = entry.rpartition("@")
            if _domain_key(entry_domain) != domain:
                continue
            if not entry_local or entry_local == local:
                return True
        return False

    # changing

    def add(self, name: str, password: str, addresses: Iterable[str] = ()) -> UserRecord:
        key = self._checked_name(name)
        record = UserRecord(key, self._hash(password), self._checked_addresses(addresses))

        def change(users: dict[str, UserRecord]) -> None:
            if key in users:
                raise UserStoreError(
                    f"user {key} already exists in {self._path}; change its password instead."
                )
            users[key] = record

        self._modify(change)
        return record

    def set_password(self, name: str, password: str) -> UserRecord:
        key = self._checked_name(name)
        password_hash = self._hash(password)
        return self._replace(key, lambda old: UserRecord(old.name, password_hash, old.addresses))

    def set_addresses(self, name: str, addresses: Iterable[str]) -> UserRecord:
        key = self._checked_name(name)
        checked = self._checked_addresses(addresses)
        return self._replace(key, lambda old: UserRecord(old.name, old.password_hash, checked))

    def delete(self, name: str) -> None:
        key = self._checked_name(name)

        def change(users: dict[str, UserRecord]) -> None:
            if users.pop(key, None) is None:
                raise UserStoreError(f"there is no user {key} in {self._path}; check the name.")

        self._modify(change)

    # internals

    def _hash(self, password: str) -> str:
        password = unicodedata.normalize("NFC", password)
        if not password:
            raise UserStoreError("the password is empty; choose a non-empty password.")
        if _has_control(password):
            raise UserStoreError("the password contains a control character; choose one without.")
        if len(password.encode("utf-8")) > MAX_FIELD_OCTETS:
            raise UserStoreError(
                f"the password is longer than {MAX_FIELD_OCTETS} bytes; choose a shorter one."
            )
        return self._hasher.hash(password)

    def _checked_name(self, name: str) -> str:
        try:
            return _user_key(name)
        except ValueError as exc:
            raise UserStoreError(f"{exc}; choose another user name.") from None

    def _checked_addresses(self, addresses: Iterable[str]) -> tuple[str, ...]:
        checked: builtins.list[str] = []
        for address in addresses:
            try:
                checked.append(_address_entry(address))
            except ValueError as exc:
                raise UserStoreError(f"{exc}; use local@domain or @domain.") from None
        return tuple(dict.fromkeys(checked))

    def _replace(self, key: str, update: Callable[[UserRecord], UserRecord]) -> UserRecord:
        result: builtins.list[UserRecord] = []

        def change(users: dict[str, UserRecord]) -> None:
            old = users.get(key)
            if old is None:
                raise UserStoreError(f"there is no user {key} in {self._path}; add it first.")
            users[key] = update(old)
            result.append(users[key])

        self._modify(change)
        return result[0]

    def _rehash(self, record: UserRecord, password: str) -> None:
        # Best effort: a login must not fail because the server may not write the file.
        new_hash = self._hasher.hash(password)

        def change(users: dict[str, UserRecord]) -> None:
            current = users.get(record.name)
            if current is not None and current.password_hash == record.password_hash:
                users[record.name] = UserRecord(current.name, new_hash, current.addresses)

        try:
            self._modify(change)
        except (UserStoreError, OSError) as exc:
            log.warning("could not store the upgraded password hash of %s: %s", record.name, exc)

    def _refresh(self, *, force: bool = False) -> None:
        """Re-read the file if it changed; caller holds self._lock."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            self._users, self._stamp = {}, None
            return
        except OSError as exc:
            raise self._unreadable(exc) from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise self._unreadable(exc) from None
        self._users = _parse_users(self._path, data)
        self._stamp = stamp
        if st.st_mode & 0o077:
            log.warning("user file %s is readable by other users; chmod 600 it", self._path)

    def _unreadable(self, exc: OSError) -> UserStoreError:
        return UserStoreError(
            f"user file {self._path} cannot be read: {exc.strerror or exc}; "
            "make it readable by the user mailward runs as."
        )

    def _modify(self, change: Callable[[dict[str, UserRecord]], None]) -> None:
        with self._lock, self._file_lock():
            self._refresh(force=True)
            users = dict(self._users)
            change(users)
            self._write(users)
            self._users = users
            st = os.stat(self._path)
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # Serialises writers in different processes (e.g. two `mailward user` commands). The lock
        # lives beside the file because the file itself is replaced by rename.
        lock_path = self._path.with_name(f".{self._path.name}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UserStoreError(
                f"cannot create {lock_path}: {exc.strerror}; make {self._path.parent} writable by this user."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, users: dict[str, UserRecord]) -> None:
        lines = [_FILE_HEADER]
        for record in sorted(users.values(), key=lambda r: r.name):
            lines.append(f"{record.name}:{record.password_hash}:{','.join(record.addresses)}\n")
        data = "".join(lines).encode("utf-8")
        directory = self._path.parent
        try:
            owner = os.stat(self._path)
        except FileNotFoundError:
            owner = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self._path.name}.", dir=directory)
        except OSError as exc:
            raise UserStoreError(
                f"cannot write beside {self._path}: {exc.strerror}; make {directory} writable by this user."
            ) from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                # Keep the file readable by the server when root edits it on the server's behalf.
                if owner is not None and os.geteuid() == 0:
                    os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _user_key(name: str) -> str:
    key = unicodedata.normalize("NFC", name).strip().lower()
    if not key:
        raise ValueError("the user name is empty")
    if ":" in key or "," in key or any(ch.isspace() for ch in key) or _has_control(key):
        raise ValueError(f"the user name {name!r} contains a colon, comma, space or control character")
    return key


def _address_entry(entry: str) -> str:
    text = unicodedata.normalize("NFC", entry).strip()
    local, at, domain = text.rpartition("@")
    bad = not at or not domain or any(ch.isspace() or ch in ":," for ch in text) or _has_control(text)
    if bad or (local == "" and text[0] != "@"):
        raise ValueError(f"the sender address {entry!r} is not an address")
    return f"{local}@{domain.lower().rstrip('.')}"


def _domain_key(domain: str) -> str:
    name = domain.lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except UnicodeError:  # idna.IDNAError is one
        return name


def _parse_users(path: Path, data: bytes) -> dict[str, UserRecord]:
    users: dict[str, UserRecord] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserStoreError(f"{path} line {number} is not UTF-8; re-save the file as UTF-8.") from None
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) not in (2, 3):
            raise UserStoreError(
                f"{path} line {number} is malformed; each line must be name:argon2id-hash:addresses."
            )
        name, password_hash = fields[0], fields[1]
        addresses = fields[2] if len(fields) == 3 else ""
        try:
            key = _user_key(name)
        except ValueError as exc:
            raise UserStoreError(f"{path} line {number}: {exc}; fix the name.") from None
        if not password_hash.startswith("$argon2id$"):
            raise UserStoreError(
                f"{path} line {number} has no argon2id password hash; set the user's password again."
            )
        entries: builtins.list[str] = []
        for entry in addresses.split(","):
            if not entry.strip():
                continue
            try:
                entries.append(_address_entry(entry))
            except ValueError as exc:
                raise UserStoreError(f"{path} line {number}: {exc}; use local@domain or @domain.") from None
        if key in users:
            raise UserStoreError(f"{path} line {number} repeats user {key}; keep only one line for it.")
        users[key] = UserRecord(key, password_hash, tuple(entries))
    return users


# --- throttling ------------------------------------------------------------------------------


@dataclass
class _Failures:
    times: deque[float]
    locked_until: float = 0.0


@dataclass(frozen=True, slots=True)
class AuthTicket:
    """One password check in flight, as `AuthThrottle.admit` counted it."""

    ip: str
    user: str | None
    keys: tuple[tuple[bool, str], ...]  # (per address?, key) as counted


class AuthThrottle:
    """Failed-AUTH limits per client address and per user name. Pure: the caller passes `now`.

    The server asks `check` before an exchange (a lockout is answered 454 4.7.0), takes a slot
    with `admit` before the slow password check and gives it back with `settle`, and waits
    `delay_for` before answering a failure. IPv6
    clients count per /64, the block one subscriber usually holds. Each table keeps at most
    `max_entries` keys, dropping the least recently failed first.

    The per-user lockout stops guessing one password from many addresses, but on its own it would
    also let anyone lock a user out. So an address from which the user logged in within
    `known_for` seconds is exempt from that user's lockout and delay (never from its own address
    limit): the user keeps working from where they usually are while the guessing is stopped.
    """

    def __init__(
        self,
        *,
        ip_limit: int = 10,
        user_limit: int = 5,
        window: float = 15 * 60.0,
        lockout: float = 15 * 60.0,
        first_delay: float = 0.5,
        max_delay: float = 8.0,
        max_entries: int = 100_000,
        known_for: float = 30 * 86400.0,
    ) -> None:
        if ip_limit < 1 or user_limit < 1 or max_entries < 1:
            raise ValueError("AuthThrottle limits must be at least 1")
        self.ip_limit = ip_limit
        self.user_limit = user_limit
        self.window = window
        self.lockout = lockout
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.max_entries = max_entries
        self.known_for = known_for
        self._by_ip: OrderedDict[str, _Failures] = OrderedDict()
        self._by_user: OrderedDict[str, _Failures] = OrderedDict()
        # (user key, address key) -> time of the last successful login from there
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Password checks in flight per key: each may still turn out a failure.
        self._pending: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._by_ip) + len(self._by_user)

    def check(self, ip: str, user: str | None, now: float) -> float | None:
        """None if an attempt is allowed now, else the seconds left of the lockout."""
        remaining = 0.0
        for table, key in self._keys(ip, user, now):
            entry = table.get(key)
            if entry is not None:
                remaining = max(remaining, entry.locked_until - now)
        return remaining if remaining > 0 else None

    def delay_for(self, ip: str, user: str | None, now: float) -> float:
        """Seconds to wait before answering a failed attempt; grows with recent failures."""
        count = 0
        for table, key in self._keys(ip, user, now):
            entry = table.get(key)
            if entry is not None:
                count = max(count, sum(1 for t in entry.times if t > now - self.window))
        if count == 0:
            return 0.0
        return float(min(self.max_delay, self.first_delay * 2 ** min(count - 1, 32)))

    def failure(self, ip: str, user: str | None, now: float) -> None:
        self._record(self._keys(ip, user), now)

    def _record(self, keys: Iterable[tuple[OrderedDict[str, _Failures], str]], now: float) -> None:
        for table, key in keys:
            limit = self.ip_limit if table is self._by_ip else self.user_limit
            entry = table.get(key)
            if entry is None:
                entry = table[key] = _Failures(deque(maxlen=limit))
            else:
                table.move_to_end(key)
            while entry.times and entry.times[0] <= now - self.window:
                entry.times.popleft()
            entry.times.append(now)
            if len(entry.times) >= limit and entry.locked_until <= now:
                entry.locked_until = now + self.lockout
            self._evict(table, now)

    def admit(self, ip: str, user: str | None, now: float) -> AuthTicket | None:
        """A slot for one password check, or None while the checks in flight could, all failing,
        reach a limit: then the caller waits for one of them to settle and asks again.

        Counting checks in flight keeps parallel guesses within the limit, since they cannot all
        pass `check` first. They are not failures: a burst of correct logins from one address
        (an application opening fifty connections at once) is never locked out by its own
        successes, it only waits while the checks run.
        """
        keys = tuple((table is self._by_ip, key) for table, key in self._keys(ip, user, now))
        for is_ip, key in keys:
            entry = (self._by_ip if is_ip else self._by_user).get(key)
            recent = 0 if entry is None else sum(1 for t in entry.times if t > now - self.window)
            limit = self.ip_limit if is_ip else self.user_limit
            if recent + self._pending.get(self._pending_key(is_ip, key), 0) >= limit:
                return None
        for is_ip, key in keys:
            pending_key = self._pending_key(is_ip, key)
            self._pending[pending_key] = self._pending.get(pending_key, 0) + 1
        return AuthTicket(ip, user, keys)

    def settle(self, ticket: AuthTicket, *, failed: bool, now: float) -> None:
        """Give back the slot `admit` handed out; a failed check is counted as a failure."""
        for is_ip, key in ticket.keys:
            pending_key = self._pending_key(is_ip, key)
            left = self._pending.get(pending_key, 0) - 1
            if left > 0:
                self._pending[pending_key] = left
            else:
                self._pending.pop(pending_key, None)
        if failed:
            self._record(((self._by_ip if is_ip else self._by_user, key) for is_ip, key in ticket.keys), now)

    @staticmethod
    def _pending_key(is_ip: bool, key: str) -> tuple[str, str]:
        return ("ip" if is_ip else "user", key)

    def success(self, ip: str, user: str | None, now: float | None = None) -> None:
        """Remember that `user` logged in from `ip`. The user's failures stay counted: were they
        cleared, every login of the real user would give a guesser a fresh allowance."""
        if user and now is not None:
            pair = (_throttle_user_key(user), _throttle_ip_key(ip))
            self._known[pair] = now
            self._known.move_to_end(pair)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)

    def _keys(self, ip: str, user: str | None,
              now: float | None = None) -> builtins.list[tuple[OrderedDict[str, _Failures], str]]:
        ip_key = _throttle_ip_key(ip)
        keys = [(self._by_ip, ip_key)]
        if user:
            user_key = _throttle_user_key(user)
            known = self._known.get((user_key, ip_key))
            if now is None or known is None or known <= now - self.known_for:
                keys.append((self._by_user, user_key))
        return keys

    def _evict(self, table: OrderedDict[str, _Failures], now: float) -> None:
        while table:
            entry = next(iter(table.values()))
            stale = entry.locked_until <= now and (not entry.times or entry.times[-1] <= now - self.window)
            if not stale and len(table) <= self.max_entries:
                break
            table.popitem(last=False)


def _throttle_ip_key(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _throttle_user_key(user: str) -> str:
    return unicodedata.normalize("NFC", user).strip().lower()
