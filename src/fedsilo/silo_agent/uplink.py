"""This silo's side of the update codec: encode each round's delta, keep the error-feedback residual.

The residual (what the codec dropped: `(delta + residual) - decode(payload)`) is added to
the next round's delta, so a lossy codec delays information instead of losing it. It lives
in memory and, when the agent has a state directory, in `<state_dir>/residual.safetensors`
so that a restarted agent keeps it. A residual made with another codec, for another job or
silo, or for a round not before the one being encoded is dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fedsilo import codecs
from fedsilo.adapters import AdapterError, State, from_bytes, to_bytes
from fedsilo.spec import CodecSpec
from fedsilo.strategies import ClientConfig
from fedsilo.strategies.ffa_lora import omitted_names

log = logging.getLogger("fedsilo.silo")
RESIDUAL_FILE = "residual.safetensors"


class Uplink:
    """Encodes one silo's updates with its codec, carrying the residual from round to round."""

    def __init__(self, codec: CodecSpec, owner: str, state_dir: Path | None = None) -> None:
        self.codec, self.owner = codec, owner  # owner: "<job>/<silo>", recorded with the residual
        self.path = state_dir / RESIDUAL_FILE if state_dir is not None else None
        self.residual: State = {}
        self.round = 0  # the round whose upload left `residual`
        self._pending: tuple[int, State] | None = None
        self._load()

    @property
    def label(self) -> str:
        """The codec and whether it feeds errors back: a residual is kept only under the same label."""
        return f"{codecs.codec_name(self.codec)};ef={self.codec.error_feedback}"

    def encode(self, round_: int, delta: Mapping[str, torch.Tensor], client_config: ClientConfig) -> bytes:
        """The payload for round `round_`; the new residual waits for `commit` (the upload counted)."""
        names = codecs.sent_names(delta, omitted_names(delta, client_config))
        residual = self.residual if self._fits(round_, delta, names) else {}
        data, new = codecs.encode(delta, self.codec, names, residual)
        self._pending = (round_, new)
        return data

    def commit(self) -> None:
        """The last encoded upload was accepted: its residual is the one to carry on."""
        if self._pending is None:
            return
        self.round, self.residual = self._pending
        self._pending = None
        self._save()

    def _fits(self, round_: int, delta: Mapping[str, torch.Tensor], names: list[str]) -> bool:
        if not self.residual:
            return False
        shapes_match = sorted(self.residual) == names and all(
            self.residual[n].shape == delta[n].shape for n in names
        )
        return shapes_match and self.round < round_

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = self.path.read_bytes()
            meta = codecs.metadata(data)
            if meta.get("label") != self.label or meta.get("owner") != self.owner:
                log.info("error feedback: the saved residual is for another codec or job; starting from zero")
                return
            self.residual, self.round = from_bytes(data), int(meta.get("round", "0"))
            log.info("error feedback: residual of round %d restored from %s", self.round, self.path)
        except (AdapterError, OSError, ValueError) as exc:
            log.warning("error feedback: cannot read %s (%s); starting from zero", self.path, exc)

    def _save(self) -> None:
        if self.path is None or not (self.residual or self.path.exists()):
            return  # a lossless codec never leaves a residual: no file either
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"label": self.label, "owner": self.owner, "round": str(self.round)}
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(to_bytes(self.residual, meta))
        os.replace(partial, self.path)  # a crash leaves the old residual or the new one, never half
