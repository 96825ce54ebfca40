"""Pseudonymous user ids for `flm prepare` (`privacy.pseudonymize_users=true`).

Every original user id is replaced, as soon as the parse stage has read it and before anything
is bucketed or written, by a keyed hash:

    pseudonym(id) = hex(HMAC-SHA256(key, "flm_dist/user-id/v1" 0x00 UTF-8(id)))[:32]

(128 bits: two of a billion users share a pseudonym with probability about 1e-21). The key is
read by the driver from an environment variable (`privacy.key_env`, FLM_PSEUDONYM_KEY by default)
or a file (`privacy.key_file`) and must be at least 32 bytes. Without the key the mapping cannot
be computed or reversed, even for a guessed id; with the same key it is the same in every run, so
datasets prepared at different times (pretraining, fine-tuning) keep agreeing on their users.

The key is never written: not in the output, the manifest, the logs or anything a training run
writes. The manifest records only that the user ids are pseudonymous and a key fingerprint,

    fingerprint = hex(HMAC-SHA256(key, "flm_dist/key-fingerprint/v1"))[:16]

so that a later run can tell "same key" from "another key" (and prepare re-runs when the key
changes). Why it reveals nothing usable about the key: HMAC-SHA256 is a pseudo-random function, so
its output on a fixed public label is indistinguishable from random bits to anyone without the
key; recovering the key from it means searching the key space (2**256 for a random 32-byte key).
The label is a message no pseudonym is ever computed on (every pseudonym's message starts with
"flm_dist/user-id/v1" and a zero byte), so the fingerprint is never a user's pseudonym; and being
keyed, it is not the plain SHA-256 of the key that the same key might have published elsewhere.
Sixty-four bits are plenty to tell keys apart and leave an attacker even less to test guesses on.

Quarantined rows keep their file, row number and reason, but not their raw text, which would
hold the original user id. What the pseudonyms do and do not protect: docs/guide/privacy.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flm_dist.config import require
from flm_dist.errors import UserError

MIN_KEY_BYTES = 32
PSEUDONYM_HEX = 32
FINGERPRINT_HEX = 16
_USER_LABEL = b"flm_dist/user-id/v1\x00"
_FINGERPRINT_LABEL = b"flm_dist/key-fingerprint/v1"
WITHHELD = "<withheld: privacy.pseudonymize_users>"


@dataclasses.dataclass
class PrivacyConfig:
    """The `privacy` section of `flm prepare`: pseudonymous user ids."""

    pseudonymize_users: bool = False
    """Replace every user id by HMAC-SHA256(key, id) (32 hex digits) before anything is written;
    exports and serving then answer with these pseudonyms (docs/guide/privacy.md)."""
    key_env: str = "FLM_PSEUDONYM_KEY"
    """Environment variable holding the key (at least 32 bytes, e.g. `openssl rand -base64 48`);
    read when `key_file` is not set. The key itself is never stored anywhere."""
    key_file: str = ""
    """A file holding the key (its bytes, one trailing newline dropped); wins over `key_env`."""

    def __post_init__(self):
        require(bool(self.key_env.strip()) and "=" not in self.key_env, "key_env",
                "must name an environment variable (e.g. FLM_PSEUDONYM_KEY)")


class Pseudonymizer:
    """Keyed hashing of user ids; its repr, str and errors never show the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key is {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return f"Pseudonymizer(key=<withheld>, fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __getstate__(self) -> bytes:  # Ray ships it to the parse tasks (in memory, never to disk by us)
        return self._key

    def __setstate__(self, key: bytes) -> None:
        self._key = key

    @property
    def fingerprint(self) -> str:
        """HMAC(key, fixed label), 64 bits: tells keys apart, reveals nothing usable about the key."""
        return hmac.new(self._key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]

    def pseudonym(self, user_id: str) -> str:
        """The pseudonym of one original user id (what `flm prepare` writes for it)."""
        return hmac.new(self._key, _USER_LABEL + str(user_id).encode("utf-8"),
                        hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]

    def ids(self, users: pa.Array | pa.ChunkedArray) -> pa.Array:
        """Pseudonyms of a string array of user ids, hashing each distinct id once."""
        if isinstance(users, pa.ChunkedArray):
            users = users.combine_chunks()
        encoded = pc.dictionary_encode(users.cast(pa.string()))
        base = hmac.new(self._key, _USER_LABEL, hashlib.sha256)
        distinct = []
        for user_id in encoded.dictionary.to_pylist():
            digest = base.copy()
            digest.update(user_id.encode("utf-8"))
            distinct.append(digest.hexdigest()[:PSEUDONYM_HEX])
        return pa.array(distinct, pa.string()).take(encoded.indices)

    def events(self, events: pa.Table) -> pa.Table:
        """Parsed events with the `user` column replaced by pseudonyms."""
        if events.num_rows == 0:
            return events
        column = events.schema.get_field_index("user")
        return events.set_column(column, events.schema.field(column), self.ids(events.column("user")))

    @staticmethod
    def quarantine(bad: pa.Table) -> pa.Table:
        """Quarantined rows without their raw text (it holds the original user id)."""
        if bad.num_rows == 0 or "raw" not in bad.column_names:
            return bad
        column = bad.schema.get_field_index("raw")
        return bad.set_column(column, bad.schema.field(column), pa.array([WITHHELD] * bad.num_rows, pa.string()))


def load_pseudonymizer(config: PrivacyConfig, environ: dict[str, str] | None = None) -> Pseudonymizer | None:
    """The pseudonymizer of `config` (None when pseudonymization is off), or a one-line UserError
    when its key is missing, unreadable or shorter than MIN_KEY_BYTES."""
    if not config.pseudonymize_users:
        return None
    if config.key_file:
        try:
            raw = Path(config.key_file).expanduser().read_bytes()
        except OSError as exc:
            raise UserError(f"privacy.key_file: cannot read the pseudonym key {config.key_file}: "
                            f"{exc.strerror or exc}") from None
        key = raw[:-2] if raw.endswith(b"\r\n") else raw.removesuffix(b"\n")
        source = f"privacy.key_file {config.key_file}"
    else:
        environ = os.environ if environ is None else environ
        value = environ.get(config.key_env)
        if not value:
            raise UserError(f"privacy.pseudonymize_users=true needs a key: set the environment variable "
                            f"{config.key_env} (privacy.key_env) or privacy.key_file to at least "
                            f"{MIN_KEY_BYTES} random bytes, e.g. `openssl rand -base64 48`")
        key, source = value.encode("utf-8", "surrogateescape"), f"${config.key_env}"
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"the pseudonym key in {source} is {len(key)} bytes; it needs at least {MIN_KEY_BYTES} "
                        f"random bytes, e.g. `openssl rand -base64 48`")
    return Pseudonymizer(key)


def with_key_fingerprint(pseudonyms: Pseudonymizer | None, input_fingerprint: str) -> str:
    """The input fingerprint that decides whether prepared output is up to date, with the key's
    fingerprint folded in: another key must prepare the data again."""
    if pseudonyms is None:
        return input_fingerprint
    return hashlib.sha256(f"{input_fingerprint}\0pseudonyms {pseudonyms.fingerprint}".encode()).hexdigest()


def manifest_section(pseudonyms: Pseudonymizer | None) -> dict | None:
    """What the manifest says about the user ids (never the key): None without pseudonyms."""
    if pseudonyms is None:
        return None
    return {"pseudonymous_users": True, "method": f"HMAC-SHA256, first {PSEUDONYM_HEX} hex digits",
            "key_fingerprint": pseudonyms.fingerprint}
