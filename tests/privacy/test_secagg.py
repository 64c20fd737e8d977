"""Secure aggregation with real primitives: exact sums, dropouts, uniformity, and every tampering we detect."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import stats

from fedsilo.privacy.secagg import (
    PRIME,
    HeldShares,
    PublicKeys,
    RoundKeys,
    SecAggError,
    Share,
    _interpolate,  # the Shamir core, checked directly below
    context_for,
    decode,
    encode,
    mask,
    open_inbox,
    reveal,
    reveals_from_wire,
    reveals_to_wire,
    ring_sum,
    share_secrets,
    threshold_for,
    unmask,
)

SIZE = 2_000


@dataclasses.dataclass
class Cohort:
    """One round driven by hand, the aggregator's relaying included, so tests can intervene at each step."""

    n: int
    fraction: float = 0.6
    round_: int = 1
    shape: tuple[int, ...] = (SIZE,)

    def __post_init__(self) -> None:
        self.context = context_for("job-a", self.round_)
        self.names = [f"silo-{i}" for i in range(self.n)]
        self.keys = {name: RoundKeys.generate(self.context) for name in self.names}
        self.roster = {name: k.public() for name, k in self.keys.items()}
        self.t = threshold_for(self.n, self.fraction)
        rng = np.random.default_rng(self.n)
        self.x = {name: rng.uniform(-3.0, 3.0, self.shape) for name in self.names}

    def share(self, absent: Sequence[str] = ()) -> dict[str, dict[str, bytes]]:
        """Step 2: who posted shares (U2) -> recipient -> ciphertext."""
        return {
            u: share_secrets(self.keys[u], u, self.roster, self.t, self.context) for u in self.names if u not in absent
        }

    def open(self, sealed: dict[str, dict[str, bytes]]) -> dict[str, dict[str, HeldShares]]:
        return {
            v: open_inbox(self.keys[v], v, self.roster, {u: sealed[u][v] for u in sealed}, self.context) for v in sealed
        }

    def run(self, before: Sequence[str] = (), after: Sequence[str] = (), reveals: int | None = None) -> np.ndarray:
        """A whole round; returns the decoded unmasked sum."""
        sealed = self.share(before)
        u2 = {u: self.roster[u] for u in sealed}
        held = self.open(sealed)
        u3 = [u for u in u2 if u not in after]
        masked = [mask(encode(self.x[u]), self.keys[u], u, u2, self.context) for u in u3]
        opened = [reveal(held[v], u2, u3, threshold=self.t) for v in u3][:reveals]
        return decode(unmask(functools.reduce(ring_sum, masked), u2, u3, opened, self.t, self.context))

    def plain(self, survivors: Sequence[str]) -> np.ndarray:
        return np.sum([self.x[u] for u in survivors], axis=0)


def assert_sum(cohort: Cohort, got: np.ndarray, survivors: Sequence[str]) -> None:
    np.testing.assert_allclose(got, cohort.plain(survivors), rtol=0, atol=len(survivors) * 2.0**-25)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_masked_sum_equals_plain_sum(n: int) -> None:
    cohort = Cohort(n)
    assert_sum(cohort, cohort.run(), cohort.names)


@pytest.mark.parametrize("shape", [(3, 30_001), (0,), (1,)])
def test_long_shaped_and_tiny_vectors(shape: tuple[int, ...]) -> None:
    cohort = Cohort(3, shape=shape)  # 90_003 elements span two keystream chunks, unevenly
    got = cohort.run(after=["silo-2"])
    assert got.shape == shape
    assert_sum(cohort, got, ["silo-0", "silo-1"])


@pytest.mark.parametrize(("n", "fraction", "drops"), [(4, 0.6, 1), (7, 0.6, 1), (7, 0.51, 3), (5, 0.6, 2)])
def test_dropouts_after_masking_still_unmask_exactly(n: int, fraction: float, drops: int) -> None:
    cohort = Cohort(n, fraction)
    assert drops <= n - cohort.t
    dropped = cohort.names[1 : 1 + drops]
    survivors = [u for u in cohort.names if u not in dropped]
    assert_sum(cohort, cohort.run(after=dropped), survivors)


def test_a_silo_that_never_shared_is_simply_absent() -> None:
    cohort = Cohort(6, 0.51)
    survivors = [u for u in cohort.names if u not in ("silo-0", "silo-4")]
    assert_sum(cohort, cohort.run(before=["silo-0"], after=["silo-4"]), survivors)


def test_one_masked_update_looks_uniform_in_the_ring() -> None:
    cohort = Cohort(3)
    structured = encode(np.tile([0.0, 0.5, -1.25, 3.0], 25_000))
    masked = mask(structured, cohort.keys["silo-0"], "silo-0", cohort.roster, cohort.context)

    def top_byte_p(values: np.ndarray) -> float:
        counts = np.bincount((values >> np.uint64(56)).astype(np.int64), minlength=256)
        return float(stats.chisquare(counts).pvalue)

    assert top_byte_p(masked) > 1e-4
    assert top_byte_p(structured) < 1e-4  # the same test does reject what was masked
    assert (
        top_byte_p(mask(encode(np.zeros(100_000)), cohort.keys["silo-1"], "silo-1", cohort.roster, cohort.context))
        > 1e-4
    )


def test_fewer_than_threshold_reveals_are_refused() -> None:
    cohort = Cohort(5)
    with pytest.raises(SecAggError, match="reveals"):
        cohort.run(reveals=cohort.t - 1)
    with pytest.raises(SecAggError, match="survivors"):
        cohort.run(after=cohort.names[: cohort.n - cohort.t + 1])


def test_tampered_replayed_and_misaddressed_shares_are_detected() -> None:
    cohort = Cohort(3)
    sealed = cohort.share()
    me, keys = "silo-1", cohort.keys["silo-1"]
    tampered = bytearray(sealed["silo-0"][me])
    tampered[40] ^= 1
    with pytest.raises(SecAggError, match="silo-0"):
        open_inbox(keys, me, cohort.roster, {"silo-0": bytes(tampered)}, cohort.context)
    with pytest.raises(SecAggError, match="authentication"):
        open_inbox(keys, me, cohort.roster, {"silo-0": sealed["silo-0"]["silo-2"]}, cohort.context)
    with pytest.raises(SecAggError, match="wrong length"):
        open_inbox(keys, me, cohort.roster, {"silo-0": sealed["silo-0"][me][:-1]}, cohort.context)
    with pytest.raises(SecAggError, match="not in the roster"):
        open_inbox(keys, me, cohort.roster, {"mallory": sealed["silo-0"][me]}, cohort.context)

    # The same silos' keys reused in the next round: last round's ciphertexts no longer open.
    later = dataclasses.replace(keys, context=context_for("job-a", 2))
    roster = {**cohort.roster, me: later.public()}
    with pytest.raises(SecAggError, match="authentication"):
        open_inbox(later, me, roster, {"silo-0": sealed["silo-0"][me]}, later.context)
    with pytest.raises(SecAggError, match="context"):
        open_inbox(keys, me, cohort.roster, {"silo-0": sealed["silo-0"][me]}, later.context)


def forged_round(cohort: Cohort, dropped: Sequence[str], n_reveals: int, liar: int) -> np.ndarray:
    """A round where reveal number `liar` carries a wrong y for every sender."""
    sealed = cohort.share()
    u2 = {u: cohort.roster[u] for u in sealed}
    held = cohort.open(sealed)
    u3 = [u for u in u2 if u not in dropped]
    masked = [mask(encode(cohort.x[u]), cohort.keys[u], u, u2, cohort.context) for u in u3]
    opened = [reveal(held[v], u2, u3) for v in u3][:n_reveals]
    opened[liar] = {s: (kind, Share(share.x, (share.y + 1) % PRIME)) for s, (kind, share) in opened[liar].items()}
    return decode(unmask(functools.reduce(ring_sum, masked), u2, u3, opened, cohort.t, cohort.context))


@pytest.mark.parametrize("liar", [0, 2])
def test_a_forged_share_is_routed_around_with_enough_honest_reveals(liar: int) -> None:
    cohort = Cohort(7, 0.51)  # t = 4; 5 survivors reveal, one lies about both b and s_sk shares
    dropped = ["silo-3", "silo-5"]
    survivors = [u for u in cohort.names if u not in dropped]
    assert_sum(cohort, forged_round(cohort, dropped, n_reveals=5, liar=liar), survivors)


def test_a_forged_share_without_spare_reveals_names_the_silo() -> None:
    cohort = Cohort(5, 0.51)  # t = 3
    with pytest.raises(SecAggError, match=r"'silo-0'.*verifies"):
        forged_round(cohort, ["silo-4"], n_reveals=cohort.t, liar=1)


def test_unmask_refuses_a_reveal_of_the_wrong_kind() -> None:
    cohort = Cohort(4)
    sealed = cohort.share()
    held = cohort.open(sealed)
    u3 = cohort.names[:3]
    masked = [mask(encode(cohort.x[u]), cohort.keys[u], u, cohort.roster, cohort.context) for u in u3]
    opened = [reveal(held[v], cohort.names, cohort.names) for v in u3]
    with pytest.raises(SecAggError, match="fate"):
        unmask(functools.reduce(ring_sum, masked), cohort.roster, u3, opened, cohort.t, cohort.context)


def test_reveal_never_gives_both_kinds_for_one_sender() -> None:
    cohort = Cohort(4)
    held = cohort.open(cohort.share())["silo-0"]
    first = reveal(held, cohort.names, cohort.names)
    assert {kind for kind, _ in first.values()} == {"b"}
    kinds = {sender: kind for sender, (kind, _) in first.items()}
    with pytest.raises(SecAggError, match="refusing to reveal 'silo-3'"):
        reveal(held, cohort.names, cohort.names[:3], revealed=kinds)
    with pytest.raises(SecAggError, match="never posted"):
        reveal(held, cohort.names[:3], cohort.names)
    with pytest.raises(SecAggError, match="threshold"):
        reveal(held, cohort.names, cohort.names[:2], threshold=3)


def test_encode_decode_round_trip_and_refusals() -> None:
    values = np.array([0.0, -1.0, 1.5, -(2.0**37), 2.0**-24, -123.456])
    np.testing.assert_allclose(decode(encode(values)), values, atol=2.0**-25, rtol=0)
    assert encode(values).dtype == np.uint64
    for bad in (np.nan, np.inf, -np.inf, 2.0**38, -(2.0**38)):
        with pytest.raises(SecAggError):
            encode(np.array([0.0, bad]))
    with pytest.raises(SecAggError):
        decode(np.zeros(3, dtype=np.int64))
    with pytest.raises(SecAggError, match="shapes"):
        ring_sum(np.zeros(2, np.uint64), np.zeros(3, np.uint64))


def test_wire_formats_round_trip_and_validate() -> None:
    cohort = Cohort(3)
    public = cohort.roster["silo-0"]
    assert PublicKeys.from_wire(public.to_wire()) == public
    broken_keys: list[object] = [
        {**public.to_wire(), "s_pk": "AAAA"},
        {"c_pk": public.to_wire()["c_pk"]},
        [],
        {"c_pk": "!"},
    ]
    for broken in broken_keys:
        with pytest.raises(SecAggError):
            PublicKeys.from_wire(broken)
    share = Share(3, 2**520)
    assert Share.from_wire(share.to_wire()) == share
    for x, y in ((0, 1), (True, 1), (1, 2**521 - 1), (1, -1)):
        with pytest.raises(SecAggError):
            Share(x, y)
    with pytest.raises(SecAggError):
        Share.from_wire({"x": "1", "y": share.to_wire()["y"]})
    revealed = {"silo-1": ("b", share), "silo-2": ("s", Share(1, 5))}
    assert reveals_from_wire(reveals_to_wire(revealed)) == revealed
    with pytest.raises(SecAggError):
        reveals_from_wire({"silo-1": {"kind": "both", **share.to_wire()}})


def test_keys_and_rosters_are_checked() -> None:
    cohort = Cohort(3)
    keys, ctx = cohort.keys["silo-0"], cohort.context
    with pytest.raises(SecAggError, match="other keys"):
        share_secrets(cohort.keys["silo-1"], "silo-0", cohort.roster, 2, ctx)
    with pytest.raises(SecAggError, match="threshold"):
        share_secrets(keys, "silo-0", cohort.roster, 4, ctx)
    with pytest.raises(SecAggError, match="share a public key"):
        share_secrets(keys, "silo-0", {**cohort.roster, "copycat": cohort.roster["silo-1"]}, 2, ctx)
    with pytest.raises(SecAggError, match="uint64"):
        mask(np.zeros(3), keys, "silo-0", cohort.roster, ctx)
    with pytest.raises(SecAggError):
        RoundKeys(c_sk=b"short", s_sk=keys.s_sk, b_seed=keys.b_seed, context=ctx)
    assert "b_seed" not in repr(keys) and "s_sk" not in repr(keys)
    assert context_for("job-a", 1) != context_for("job-a", 2) != context_for("job-b", 2)
    with pytest.raises(SecAggError):
        context_for("job-a", -1)


@pytest.mark.parametrize(("n", "fraction", "t"), [(1, 0.6, 1), (2, 0.6, 2), (4, 0.6, 3), (7, 0.51, 4), (50, 0.66, 33)])
def test_threshold_for(n: int, fraction: float, t: int) -> None:
    assert threshold_for(n, fraction) == t


def test_threshold_fraction_must_be_a_majority() -> None:
    for fraction in (0.5, 0.2, 1.01):
        with pytest.raises(SecAggError):
            threshold_for(5, fraction)


def test_threshold_shares_rebuild_a_seed_and_fewer_say_nothing() -> None:
    cohort = Cohort(5)  # t = 3
    held = cohort.open(cohort.share())
    points = [held[v]["silo-0"].b for v in cohort.names]
    seed = int.from_bytes(cohort.keys["silo-0"].b_seed, "big")
    assert _interpolate(points[1 : 1 + cohort.t]) == seed
    assert _interpolate(points[: cohort.t - 1]) != seed  # a degree t-1 polynomial: t-1 points fit any secret
