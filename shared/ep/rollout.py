"""A rank's side of an EPLB rollout: stage a new placement's experts in the background while the
old placement keeps serving, then switch at a step every rank of the group agreed on.

Agreement rides on the step's `go` exchange (group.py): each rank reports the newest placement
version it has staged; when every rank reports version v, all switch to v before that step —
the same step everywhere, since every rank sees the same reports. The balancer publishes
version v + 1 only once every rank computes with v, so ranks never stage different versions.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from shared.ep.moe import EPMoE
from shared.model.experts import MLP, ExpertStack
from shared.model.loader import read_tensors

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Rollout:
    def __init__(self, model_path: Path, dtype: torch.dtype, layers: list[EPMoE], version: int = 0):
        self.model_path, self.dtype, self.layers = Path(model_path), dtype, layers
        self.version = version  # the placement in use
        # (version, phy2log, this rank's experts, the owners maps they were staged under)
        self._staged: tuple[int, list[list[int]], list[ExpertStack], list[list[int]]] | None = None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.num_experts_read = 0

    @property
    def staged_version(self) -> int:
        """What this rank reports in the go exchange: its staged version, else the one in use."""
        with self._lock:
            staged = self._valid_staged()
            return staged[0] if staged is not None else self.version

    @property
    def is_staging_free(self) -> bool:
        with self._lock:
            return self._valid_staged() is None

    def owners(self) -> list[list[int]]:
        return [list(moe.owners) for moe in self.layers]

    def _valid_staged(self):
        """The staged placement, dropped (under the lock) if the group re-formed since it was
        staged: its experts are those of this rank's slots under the old owners map. A staging
        that was in flight when the group re-formed lands after the re-forming dropped what was
        staged; this is what keeps it from being switched to."""
        if self._staged is not None and self._staged[3] != self.owners():
            self._staged = None
        return self._staged

    def read_expert(self, layer: int, expert: int) -> nn.Module:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}."
        tensors = read_tensors(self.model_path, [prefix + p + ".weight" for p in PROJECTIONS], self.dtype)
        hidden, inter = tensors[prefix + "gate_proj.weight"].shape[1], tensors[prefix + "gate_proj.weight"].shape[0]
        with torch.device("meta"):
            mlp = MLP(hidden, inter)
        for p in PROJECTIONS:
            getattr(mlp, p).weight = nn.Parameter(tensors[prefix + p + ".weight"], requires_grad=False)
        with self._count_lock:  # experts are read on several threads (EPMoE.stage)
            self.num_experts_read += 1
        return mlp

    def stage(self, version: int, phy2log: list[list[int]]) -> None:
        """Blocking (run it in a thread): read the experts the new placement adds to this rank."""
        if version <= self.version:
            return
        if len(phy2log) != len(self.layers):
            raise ValueError(f"placement version {version} covers {len(phy2log)} MoE layers; the model has "
                             f"{len(self.layers)}")
        with self._lock:
            owners = self.owners()
        staged = [moe.stage(row, self.read_expert, o) for moe, row, o in zip(self.layers, phy2log, owners)]
        with self._lock:
            self._staged = (version, [list(r) for r in phy2log], staged, owners)

    def switch(self, version: int) -> bool:
        """Between steps, on the compute thread: take the staged placement if it is `version`."""
        with self._lock:
            if self._valid_staged() is None or self._staged[0] != version:
                return False
            _, phy2log, staged, owners = self._staged
            for moe, row, experts, o in zip(self.layers, phy2log, staged, owners):
                moe.switch(row, experts, o)
            self.version, self._staged = version, None
            return True

    def discard(self) -> None:
        """Drop a staged placement (it was staged for slots this rank no longer holds)."""
        with self._lock:
            self._staged = None

    def stage_members(self, phy2log: list[list[int]], owners: list[list[int]]) -> list[ExpertStack]:
        """Blocking (run it in a thread): this rank's experts under a new owners map (the group
        re-formed), reading those it does not hold."""
        return [moe.stage(row, self.read_expert, o) for moe, row, o in zip(self.layers, phy2log, owners)]

    def switch_members(self, version: int, phy2log: list[list[int]], owners: list[list[int]],
                       staged: list[ExpertStack]) -> None:
        """On the compute thread, between steps: compute with the staged owners map."""
        with self._lock:
            for moe, row, o, experts in zip(self.layers, phy2log, owners, staged):
                moe.switch(row, experts, o)
            self.version = version

    def placement(self) -> list[list[int]]:
        return [list(moe.phy2log) for moe in self.layers]
