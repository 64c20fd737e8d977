"""The silo's side of a secure round: what it posts at each SecAgg stage, and what it keeps.

The order puts the waiting where nobody waits: keys and shares are exchanged before local
training (all participants are idle then, answering within a poll), so once training is
done only the masked upload and one reveal follow. The plain delta never leaves this
object unmasked; the private keys never leave this process.
"""

from __future__ import annotations

import base64
import logging

import torch

from fedsilo.adapters import schema_of
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError
from fedsilo.privacy import dp, secagg, vectors
from fedsilo.strategies.ffa_lora import zero_by_contract

log = logging.getLogger("fedsilo.silo")
POLL_SECONDS = 20.0


class SitOut(Exception):
    """This silo cannot take part in the rest of the round (too late, restarted, dropped by the others)."""


class SecureRound:
    def __init__(self, client: Client, me: str, round_: int) -> None:
        self.client, self.me, self.round = client, me, round_
        self.context = secagg.context_for(client.job, round_)
        self.keys = secagg.RoundKeys.generate(self.context)
        self.roster: dict[str, secagg.PublicKeys] = {}
        self.held: dict[str, secagg.HeldShares] = {}
        self.shared: list[str] = []

    def _put(self, what: str, body: m.Wire) -> None:
        try:
            self.client.secagg_put(self.round, what, body)
        except ClientError as exc:
            if exc.status in (403, 404, 409):  # the round went on without us, or we restarted mid-round
                raise SitOut(f"{what}: {exc}") from None
            raise

    def _after(self, stage: str) -> m.SecAggView:
        """Wait until the round has left `stage`; a round that failed meanwhile is left."""
        while True:
            view = self.client.secagg_view(self.round, after=stage, wait=POLL_SECONDS)
            if view.stage == "failed":
                raise SitOut("the round failed")
            if view.stage != stage:
                return view

    def exchange_keys(self) -> None:
        """Stages 1-2: publish this round's keys, then secret-share them with the key roster."""
        self._put("keys", m.SecAggKeys(**self.keys.public().to_wire()))
        view = self._after("keys")
        if self.me not in view.roster:
            raise SitOut("our keys arrived after the key roster closed")
        self.roster = {name: secagg.PublicKeys.from_wire(k.model_dump()) for name, k in view.roster.items()}
        bundles = secagg.share_secrets(self.keys, self.me, self.roster, view.threshold, self.context)
        self._put("shares", m.SecAggShares(ciphertexts={k: base64.b64encode(v).decode() for k, v in bundles.items()}))
        log.info(
            "round %d: keys and shares exchanged with %d silos (t=%d)", self.round, len(self.roster), view.threshold
        )

    def masked(self, delta: dict[str, torch.Tensor], task: m.Task, n_examples: int) -> bytes:
        """Stage 3: the delta, weighted (or clipped and noised under DP), fixed-point encoded and masked."""
        view = self._after("shares")
        if self.me not in view.shared:
            raise SitOut("our shares arrived after the share roster closed")
        inbox = {sender: base64.b64decode(text) for sender, text in view.inbox.items()}
        self.held = secagg.open_inbox(self.keys, self.me, self.roster, inbox, self.context)
        self.shared = view.shared
        weight = float(n_examples)
        if "clip_norm" in task.client_config:  # clipped-fedavg: the aggregator cannot clip a masked delta
            delta = dp.clip(delta, float(task.client_config["clip_norm"]))
        if task.dp:  # client-level DP: sensitivity C, each silo adds its share of the noise
            delta = dp.clip(delta, task.dp["clip_norm"])
            noise = dp.gaussian(delta, task.dp["noise_std"])
            delta = {k: v.double() + noise[k] for k, v in delta.items()}
            weight = 1.0
        zero = zero_by_contract(task.client_config)
        vector = vectors.flatten(delta, vectors.layout(schema_of(delta), zero)) * weight
        peers = {name: self.roster[name] for name in self.shared}
        ring = secagg.mask(secagg.encode(vector), self.keys, self.me, peers, self.context)
        return ring.astype("<u8").tobytes()

    def reveal(self) -> None:
        """Stage 4: reveal, for each silo that shared, the one share the survivors' sum needs."""
        view = self._after("masking")
        if view.stage in ("aggregating", "closed"):
            return  # the others' reveals were enough
        if self.me not in view.masked:
            raise SitOut("our masked update is not among those counted")
        shares = secagg.reveals_to_wire(secagg.reveal(self.held, self.shared, view.masked, threshold=view.threshold))
        try:
            self._put("reveal", m.SecAggReveal.model_validate({"shares": shares}))
        except SitOut:
            if self.client.secagg_view(self.round).stage in ("aggregating", "closed"):
                return  # t others revealed first: the round needs no more
            raise
        log.info(
            "round %d: shares revealed (%d of %d masked updates count)", self.round, len(view.masked), len(self.shared)
        )
