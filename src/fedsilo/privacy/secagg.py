"""Secure aggregation: the aggregator learns the sum of the silos' updates and nothing else.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), semi-honest server, one round at a time:

1. every silo makes `RoundKeys` and publishes `PublicKeys`; the aggregator relays the roster U1;
2. every silo Shamir-shares its mask key s_sk and self-mask seed b among U1 (`share_secrets`),
   each pair of shares encrypted for its recipient; U2 = the silos that posted shares;
3. every silo of U2 uploads `mask(x)` = x + PRG(b) + sum over v of +-PRG(s_uv) in Z_2^64;
   U3 = the silos whose masked input arrived;
4. survivors `reveal` b shares of U3 and s_sk shares of U2 minus U3 (never both for one silo),
   and `unmask` removes the self-masks and the masks dropped silos left in the sum.

Threshold t: any t silos together with the aggregator can rebuild a silo's secrets, so a
coalition of the aggregator and up to t-1 silos learns only the sum of the surviving honest
silos' inputs; the round survives up to |U1| - t dropouts. Cost: O(n) key agreements and
O(n) PRG expansions of the vector per silo; the aggregator expands |U3| self-masks plus
|U3| masks per dropped silo.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import math
import secrets
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RING = 2**64
FRACTION_BITS = 24
PRIME = 2**521 - 1  # Shamir field: a Mersenne prime larger than any 32-byte secret
KEY_BYTES = 32
Y_BYTES = 66  # ceil(521 / 8): a field element on the wire
MAX_SUBSETS = 64  # reconstruction attempts per secret before blaming its shares
_LIMIT = 2.0**62  # |x| * 2^FRACTION_BITS must stay below this: headroom for sums
_NONCE_BYTES = 12
_CHUNK = 1 << 16  # ring elements expanded per keystream call: 512 KiB of scratch, stays in cache
_PLAINTEXT = struct.Struct(f">I{Y_BYTES}s{Y_BYTES}s")  # x, s_sk share y, b share y
_LABEL = b"fedsilo-secagg-v1"

Kind = Literal["b", "s"]


class SecAggError(ValueError):
    """A secure-aggregation input is malformed, tampered with, or insufficient."""


@dataclass(frozen=True)
class PublicKeys:
    """What one silo publishes for a round: channel key, mask key, commitment to its seed."""

    c_pk: bytes
    s_pk: bytes
    b_commit: bytes

    def __post_init__(self) -> None:
        for name in ("c_pk", "s_pk", "b_commit"):
            _check_bytes(getattr(self, name), KEY_BYTES, name)

    def to_wire(self) -> dict[str, str]:
        """Base64 fields, for JSON."""
        return {name: _b64(getattr(self, name)) for name in ("c_pk", "s_pk", "b_commit")}

    @classmethod
    def from_wire(cls, data: object) -> PublicKeys:
        """Parse and validate what `to_wire` produced (it came from the network)."""
        if not isinstance(data, Mapping):
            raise SecAggError("public keys must be an object")
        return cls(**{name: _unb64(data.get(name), name) for name in ("c_pk", "s_pk", "b_commit")})


@dataclass(frozen=True)
class Share:
    """One Shamir point (x, y) over GF(2^521 - 1); x is the holder's 1-based roster index."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if type(self.x) is not int or not 0 < self.x < 2**32:
            raise SecAggError(f"share x must be an integer in [1, 2^32), got {self.x!r}")
        if type(self.y) is not int or not 0 <= self.y < PRIME:
            raise SecAggError("share y must be an integer in [0, 2^521 - 1)")

    def to_wire(self) -> dict[str, int | str]:
        """x as a number, y as base64 of its fixed-length big-endian bytes."""
        return {"x": self.x, "y": _b64(self.y.to_bytes(Y_BYTES, "big"))}

    @classmethod
    def from_wire(cls, data: object) -> Share:
        """Parse and validate what `to_wire` produced."""
        if not isinstance(data, Mapping):
            raise SecAggError("a share must be an object")
        x = data.get("x")
        if type(x) is not int:
            raise SecAggError(f"share x must be an integer, got {x!r}")
        return cls(x=x, y=int.from_bytes(_unb64(data.get("y"), "y", Y_BYTES), "big"))


@dataclass(frozen=True)
class HeldShares:
    """The two shares silo u holds for one sender: of its mask key and of its self-mask seed."""

    s_sk: Share
    b: Share


@dataclass(frozen=True)
class RoundKeys:
    """One silo's secrets for one round; raw bytes so the silo agent can persist them."""

    c_sk: bytes = field(repr=False)
    s_sk: bytes = field(repr=False)
    b_seed: bytes = field(repr=False)
    context: bytes

    def __post_init__(self) -> None:
        for name in ("c_sk", "s_sk", "b_seed", "context"):
            _check_bytes(getattr(self, name), KEY_BYTES, name)

    @classmethod
    def generate(cls, context: bytes) -> RoundKeys:
        """Fresh keys: never reuse them across rounds (masks would repeat)."""
        return cls(
            c_sk=X25519PrivateKey.generate().private_bytes_raw(),
            s_sk=X25519PrivateKey.generate().private_bytes_raw(),
            b_seed=secrets.token_bytes(KEY_BYTES),
            context=context,
        )

    def public(self) -> PublicKeys:
        """The half the aggregator relays to the cohort."""
        return PublicKeys(
            c_pk=_public_of(self.c_sk), s_pk=_public_of(self.s_sk), b_commit=_commit(self.context, self.b_seed)
        )


def context_for(job: str, round_: int) -> bytes:
    """A 32-byte tag binding keys, ciphertexts and masks to one job's round (no cross-round replay)."""
    if not isinstance(job, str) or not job or type(round_) is not int or round_ < 0:
        raise SecAggError(f"context needs a job name and a round >= 0, got {job!r}, {round_!r}")
    return hashlib.sha256(_frame(_LABEL, job.encode(), struct.pack(">Q", round_))).digest()


def threshold_for(n: int, fraction: float) -> int:
    """t = max(2, ceil(fraction * n)) capped at n; a majority so two disjoint groups cannot both unmask."""
    if type(n) is not int or n < 1:
        raise SecAggError(f"cohort size must be a positive integer, got {n!r}")
    if not 0.5 < fraction <= 1:
        raise SecAggError(f"threshold fraction must be in (0.5, 1], got {fraction}")
    return min(n, max(2, math.ceil(fraction * n)))


def share_secrets(
    keys: RoundKeys, me: str, roster: Mapping[str, PublicKeys], threshold: int, context: bytes
) -> dict[str, bytes]:
    """Shares of s_sk and b for every silo of the roster (me included), each sealed for its recipient."""
    order = _check_roster(roster, me, keys, context)
    if type(threshold) is not int or not 1 <= threshold <= len(order):
        raise SecAggError(f"threshold must be in [1, {len(order)}], got {threshold!r}")
    s_shares = _split(int.from_bytes(keys.s_sk, "big"), threshold, len(order))
    b_shares = _split(int.from_bytes(keys.b_seed, "big"), threshold, len(order))
    sealed = {}
    for index, (name, s_y, b_y) in enumerate(zip(order, s_shares, b_shares, strict=True), start=1):
        plaintext = _PLAINTEXT.pack(index, s_y.to_bytes(Y_BYTES, "big"), b_y.to_bytes(Y_BYTES, "big"))
        nonce = secrets.token_bytes(_NONCE_BYTES)
        aead = AESGCM(_channel_key(keys, me, name, roster[name], context))
        sealed[name] = nonce + aead.encrypt(nonce, plaintext, _frame(_LABEL, context, me.encode(), name.encode()))
    return sealed


def open_inbox(
    keys: RoundKeys, me: str, roster: Mapping[str, PublicKeys], inbox: Mapping[str, bytes], context: bytes
) -> dict[str, HeldShares]:
    """Decrypt the shares each sender sealed for me; any tampering or misaddressing raises."""
    order = _check_roster(roster, me, keys, context)
    my_x = order.index(me) + 1
    held = {}
    for sender, sealed in inbox.items():
        if sender not in roster:
            raise SecAggError(f"shares from {sender!r}, who is not in the roster")
        if not isinstance(sealed, bytes) or len(sealed) != _NONCE_BYTES + _PLAINTEXT.size + 16:
            raise SecAggError(f"shares from {sender!r} have the wrong length")
        aead = AESGCM(_channel_key(keys, me, sender, roster[sender], context))
        try:
            plaintext = aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _frame(_LABEL, context, sender.encode(), me.encode())
            )
        except InvalidTag:
            raise SecAggError(
                f"shares from {sender!r} fail authentication (tampered, replayed or misaddressed)"
            ) from None
        x, s_y, b_y = _PLAINTEXT.unpack(plaintext)
        if x != my_x:
            raise SecAggError(f"shares from {sender!r} carry x={x}, expected {my_x}")
        held[sender] = HeldShares(s_sk=Share(x, int.from_bytes(s_y, "big")), b=Share(x, int.from_bytes(b_y, "big")))
    return held


def mask(vector: np.ndarray, keys: RoundKeys, me: str, u2: Mapping[str, PublicKeys], context: bytes) -> np.ndarray:
    """y = x + PRG(b) + sum over v in U2 of sign(me, v) * PRG(s_me,v) in Z_2^64. Call once per round keys."""
    _check_ring(vector, "vector")
    _check_roster(u2, me, keys, context)
    out = vector.flatten()
    pairs = ((_pair_key(keys.s_sk, u2[peer].s_pk, me, peer, context), me < peer) for peer in sorted(u2) if peer != me)
    _add_streams(out, itertools.chain([(_self_mask_key(keys.b_seed, context), True)], pairs))
    return out.reshape(vector.shape)


def reveal(
    held: Mapping[str, HeldShares],
    u2: Collection[str],
    u3: Collection[str],
    *,
    threshold: int | None = None,
    revealed: Mapping[str, Kind] | None = None,
) -> dict[str, tuple[Kind, Share]]:
    """For each sender of U2: its b share if it survived (U3), its s_sk share if it dropped.

    Never both kinds for one sender: that would expose its input. Pass `revealed` (the kinds
    given out earlier this round) when asked again, and `threshold` to refuse a tiny U3.
    """
    survivors, senders = set(u3), set(u2)
    if not survivors <= senders:
        raise SecAggError(f"survivors {sorted(survivors - senders)} never posted shares")
    if threshold is not None and len(survivors) < threshold:
        raise SecAggError(f"only {len(survivors)} survivors, fewer than the threshold {threshold}")
    out: dict[str, tuple[Kind, Share]] = {}
    for sender in sorted(senders & set(held)):
        kind: Kind = "b" if sender in survivors else "s"
        if revealed is not None and revealed.get(sender, kind) != kind:
            raise SecAggError(f"refusing to reveal {sender!r}'s {kind} share after its {revealed[sender]} share")
        out[sender] = (kind, held[sender].b if kind == "b" else held[sender].s_sk)
    return out


def unmask(
    masked_sum: np.ndarray,
    u2: Mapping[str, PublicKeys],
    u3: Collection[str],
    reveals: Sequence[Mapping[str, tuple[str, Share]]],
    threshold: int,
    context: bytes,
) -> np.ndarray:
    """Remove the survivors' self-masks and the dropped silos' pairwise masks: the sum of U3's inputs."""
    _check_ring(masked_sum, "masked sum")
    survivors = set(u3)
    if not survivors <= set(u2):
        raise SecAggError(f"survivors {sorted(survivors - set(u2))} never posted shares")
    if type(threshold) is not int or threshold < 1 or len(survivors) < threshold or len(reveals) < threshold:
        raise SecAggError(f"need >= {threshold} survivors and reveals, got {len(survivors)} and {len(reveals)}")
    points = _collect(reveals, u2, survivors)
    found = {  # every secret first: a bad share fails the round before any expansion
        sender: _reconstruct(sender, points[sender], threshold, _verifier(u2[sender], sender in survivors, context))
        for sender in sorted(u2)
    }
    removals = [(_self_mask_key(found[u], context), False) for u in sorted(survivors)]
    for sender in sorted(set(u2) - survivors):  # undo what each survivor added for its pair with sender
        removals += [(_pair_key(found[sender], u2[u].s_pk, sender, u, context), u > sender) for u in sorted(survivors)]
    out = masked_sum.flatten()
    _add_streams(out, removals)
    return out.reshape(masked_sum.shape)


def encode(values: np.ndarray) -> np.ndarray:
    """Fixed point round(x * 2^24) in two's complement; refuses values a cohort's sum could overflow."""
    scaled = np.asarray(values, dtype=np.float64) * 2.0**FRACTION_BITS
    if not np.all(np.isfinite(scaled)):
        raise SecAggError("cannot encode NaN or infinite values")
    if scaled.size and np.max(np.abs(scaled)) >= _LIMIT:
        raise SecAggError(f"values must satisfy |x| < 2^{62 - FRACTION_BITS} to leave headroom for the sum")
    return np.rint(scaled).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray) -> np.ndarray:
    """Back from the ring to floats, reading the top bit as the sign."""
    _check_ring(ring, "encoded values")
    return ring.view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS


def ring_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod 2^64: how the aggregator folds masked updates as they arrive."""
    _check_ring(a, "left operand")
    _check_ring(b, "right operand")
    if a.shape != b.shape:
        raise SecAggError(f"shapes differ: {a.shape} vs {b.shape}")
    total: np.ndarray = a + b
    return total


def reveals_to_wire(shares: Mapping[str, tuple[str, Share]]) -> dict[str, dict[str, int | str]]:
    """One silo's reveal as JSON: sender -> {"kind", "x", "y"}."""
    return {sender: {"kind": kind, **share.to_wire()} for sender, (kind, share) in shares.items()}


def reveals_from_wire(data: object) -> dict[str, tuple[Kind, Share]]:
    """Parse and validate what `reveals_to_wire` produced."""
    if not isinstance(data, Mapping):
        raise SecAggError("a reveal must be an object")
    out: dict[str, tuple[Kind, Share]] = {}
    for sender, entry in data.items():
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if not isinstance(sender, str) or kind not in ("b", "s"):
            raise SecAggError(f"malformed reveal entry for {sender!r}")
        out[sender] = (kind, Share.from_wire(entry))
    return out


# --- internals -------------------------------------------------------------------------------


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation, so distinct tuples never encode alike."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, name: str, length: int = KEY_BYTES) -> bytes:
    if not isinstance(value, str):
        raise SecAggError(f"{name} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise SecAggError(f"{name} is not valid base64") from None
    return _check_bytes(raw, length, name)


def _check_bytes(value: object, length: int, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise SecAggError(f"{name} must be {length} bytes")
    return value


def _check_ring(array: object, name: str) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint64:
        raise SecAggError(f"{name} must be a uint64 numpy array")


def _check_roster(roster: Mapping[str, PublicKeys], me: str, keys: RoundKeys, context: bytes) -> list[str]:
    """Sorted names; refuses foreign types, a roster without me or with my keys wrong, a stale context."""
    if not isinstance(context, bytes) or not hmac.compare_digest(context, keys.context):
        raise SecAggError("context differs from the one these round keys were made for")
    if not all(isinstance(name, str) and name and isinstance(pk, PublicKeys) for name, pk in roster.items()):
        raise SecAggError("roster must map non-empty names to PublicKeys")
    if roster.get(me) != keys.public():
        raise SecAggError(f"roster lacks {me!r} or holds other keys for it")
    if len({pk.c_pk for pk in roster.values()}) < len(roster) or len({pk.s_pk for pk in roster.values()}) < len(roster):
        raise SecAggError("two roster entries share a public key")
    return sorted(roster)


def _public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _commit(context: bytes, b_seed: bytes) -> bytes:
    return hashlib.sha256(context + b_seed).digest()


def _agree(private: bytes, public: bytes, peer: str) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise SecAggError(f"key agreement with {peer!r} failed (low-order public key)") from None


def _hkdf(secret: bytes, *info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_frame(_LABEL, *info)).derive(secret)


def _channel_key(keys: RoundKeys, me: str, peer: str, peer_keys: PublicKeys, context: bytes) -> bytes:
    low, high = sorted((me, peer))
    return _hkdf(_agree(keys.c_sk, peer_keys.c_pk, peer), b"channel", context, low.encode(), high.encode())


def _pair_key(private: bytes, peer_s_pk: bytes, me: str, peer: str, context: bytes) -> bytes:
    low, high = sorted((me, peer))
    return _hkdf(_agree(private, peer_s_pk, peer), b"pair-mask", context, low.encode(), high.encode())


def _self_mask_key(b_seed: bytes, context: bytes) -> bytes:
    return _hkdf(b_seed, b"self-mask", context)


def _add_streams(out: np.ndarray, streams: Iterable[tuple[bytes, bool]]) -> None:
    """out +/-= PRG(key) in place, per (key, add): the AES-256-CTR keystream (zero nonce, one vector per key)
    read as little-endian uint64, expanded a chunk at a time into one reused buffer."""
    chunk = max(1, min(out.size, _CHUNK))
    zeros = memoryview(bytes(8 * chunk))
    scratch = bytearray(8 * chunk + 15)  # update_into wants a block's slack
    stream = np.frombuffer(scratch, dtype="<u8", count=chunk)
    for key, add in streams:
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        for start in range(0, out.size, chunk):
            part = out[start : start + chunk]
            encryptor.update_into(zeros[: 8 * part.size], scratch)
            if add:
                part += stream[: part.size]
            else:
                part -= stream[: part.size]


def _split(secret: int, threshold: int, n: int) -> list[int]:
    """y-values at x = 1..n of a random degree t-1 polynomial with constant term `secret`."""
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [_evaluate(coefficients, x) for x in range(1, n + 1)]


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate(points: Sequence[Share]) -> int:
    """The polynomial through `points` (distinct x), evaluated at 0."""
    total = 0
    for i, p in enumerate(points):
        num = den = 1
        for j, q in enumerate(points):
            if i != j:
                num = num * q.x % PRIME
                den = den * (q.x - p.x) % PRIME
        total = (total + p.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def _collect(
    reveals: Sequence[Mapping[str, tuple[str, Share]]], u2: Mapping[str, PublicKeys], survivors: set[str]
) -> dict[str, list[Share]]:
    """Shares per sender of U2, checked for the kind its fate calls for."""
    points: dict[str, list[Share]] = {sender: [] for sender in u2}
    for shares in reveals:
        for sender, (kind, share) in shares.items():
            if sender not in u2 or not isinstance(share, Share):
                raise SecAggError(f"a reveal names {sender!r}, who is not in U2, or holds no Share")
            if kind != ("b" if sender in survivors else "s"):
                raise SecAggError(f"a reveal gives {sender!r}'s {kind!r} share, which its fate does not call for")
            if share not in points[sender]:
                points[sender].append(share)
    return points


def _subsets(points: list[Share], threshold: int) -> Iterator[list[Share]]:
    """Cyclic windows first (each avoids any single bad share), then all t-subsets; distinct x only."""
    seen: set[tuple[int, ...]] = set()
    windows = ([points[(start + k) % len(points)] for k in range(threshold)] for start in range(len(points)))
    for subset in itertools.chain(windows, (list(c) for c in itertools.combinations(points, threshold))):
        key = tuple(sorted(points.index(p) for p in subset))
        if key not in seen and len({p.x for p in subset}) == threshold:
            seen.add(key)
            yield subset


def _verifier(public: PublicKeys, survived: bool, context: bytes) -> Callable[[bytes], bool]:
    """Check a candidate secret against what the sender published: its b commitment or its s_pk."""

    def check(secret: bytes) -> bool:
        if survived:
            return hmac.compare_digest(_commit(context, secret), public.b_commit)
        return hmac.compare_digest(_public_of(secret), public.s_pk)

    return check


def _reconstruct(sender: str, points: list[Share], threshold: int, verify: Callable[[bytes], bool]) -> bytes:
    """The sender's 32-byte secret from some t of its shares that verifies; bounded tries."""
    if len({p.x for p in points}) < threshold:
        raise SecAggError(f"only {len({p.x for p in points})} distinct shares for {sender!r}, need {threshold}")
    for subset in itertools.islice(_subsets(points, threshold), MAX_SUBSETS):
        value = _interpolate(subset)
        if value < 2 ** (8 * KEY_BYTES) and verify(candidate := value.to_bytes(KEY_BYTES, "big")):
            return candidate
    raise SecAggError(
        f"no {threshold} of {sender!r}'s {len(points)} revealed shares reconstruct a secret that verifies"
    )
