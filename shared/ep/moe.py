"""Expert parallelism as a pass over a built model: each MoE layer's routed experts are cut down
to this rank's physical slots, and the layer exchanges tokens with the group (dispatch, expert
compute, combine). Attention, dense layers, the gate and the shared expert stay local (data
parallel); the model file itself knows nothing of this.

Which rank holds a physical slot is the layer's `owners` map: slot // S while every rank is up;
when a group re-forms without a rank, that rank's slots go to the survivors (`member_owners`), so
the placement, and with it every token's routing, stays what it was.

Legend: T = tokens on this rank, K = experts per token, D = hidden, S = slots per rank,
P = (token, slot) pairs, R = ranks.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from shared.ep.wire import decode_combine, decode_dispatch, encode_combine, encode_dispatch
from shared.model.experts import ExpertStack, combine, expert_counts, run_experts
from shared.model.model import DeepseekV3
from shared.model.moe import MoE

READ_THREADS = 8  # experts read side by side from the checkpoint when a placement or the members change
EXPERT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")

# (layer, phase, one payload per rank) -> one payload from each rank
Exchange = Callable[[int, str, list[bytes]], list[bytes]]


class EPMoE(nn.Module):
    """One MoE layer of an EP rank: the gate and shared expert, and the experts of its slots."""

    collective = True  # every rank of the group calls it alike, with zero tokens if it has none (engine.py)

    def __init__(self, moe: MoE, layer: int, rank: int, size: int, phy2log: list[int], exchange: Exchange,
                 wire: str):
        super().__init__()
        self.layer, self.rank, self.size, self.wire = layer, rank, size, wire
        self.num_experts = moe.num_experts
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        self.set_owners(base_owners(len(phy2log), size))  # a re-formed group switches to another (switch)
        # local slot i holds logical expert local_slots[i]: this rank's own stack, redundant copies included
        self.use_stack(ExpertStack.from_experts([moe.experts[e] for e in self.local_slots(phy2log)]))
        self.plan = moe.plan
        if "native" in self.plan.backends:
            self.stack.packed_for_native()
        self.exchange = exchange
        self.expert_load: torch.Tensor | None = None  # [E] tokens this rank routed, by logical expert
        self.dispatched = torch.zeros(size, dtype=torch.int64)  # [R] tokens sent to each rank (self included)
        self.set_placement(phy2log)

    def set_owners(self, owners: list[int]) -> None:
        """owners[slot] = the rank that computes it; each rank's slots, in slot order, are its local
        slots 0, 1, ... (`local_index`)."""
        self.owners = list(owners)
        self.owner = torch.tensor(self.owners)  # [slots]
        self.local_index = torch.zeros(len(owners), dtype=torch.long)  # [slots] index among its owner's
        seen = [0] * self.size
        for slot, rank in enumerate(self.owners):
            self.local_index[slot] = seen[rank]
            seen[rank] += 1
        self.my_slots = [slot for slot, rank in enumerate(self.owners) if rank == self.rank]

    def set_placement(self, phy2log: list[int]) -> None:
        """Where each logical expert's replicas are: log2phy [E, X] (padded with the first), logcnt [E]."""
        replicas: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(phy2log):
            replicas[expert].append(slot)
        if any(not r for r in replicas):
            raise ValueError(f"layer {self.layer}: experts {[e for e, r in enumerate(replicas) if not r]} "
                             f"have no slot in the placement")
        width = max(len(r) for r in replicas)
        self.log2phy = torch.tensor([r + [r[0]] * (width - len(r)) for r in replicas])  # [E, X]
        self.logcnt = torch.tensor([len(r) for r in replicas])  # [E]
        self.phy2log = list(phy2log)

    def local_slots(self, phy2log: list[int], owners: list[int] | None = None) -> list[int]:
        """The logical experts of this rank's slots, under `owners` (default: the current map)."""
        if owners is None:
            return [phy2log[slot] for slot in self.my_slots]
        return [phy2log[slot] for slot, rank in enumerate(owners) if rank == self.rank]

    def use_stack(self, stack: ExpertStack) -> None:
        self.stack = stack
        self.experts = stack.modules  # views of the stack, one per local slot

    def stage(self, phy2log: list[int], read_expert: Callable[[int, int], nn.Module],
              owners: list[int] | None = None) -> ExpertStack:
        """This rank's stack of slots under a new placement (and owners map): experts it holds are
        copied from the current stack, the others read (`read_expert(layer, expert)`); runs off the
        compute thread while the current stack serves."""
        if len(phy2log) != len(self.phy2log):
            raise ValueError(f"layer {self.layer}: a placement of {len(phy2log)} slots; this group has "
                             f"{len(self.phy2log)}")
        held = dict(zip(self.local_slots(self.phy2log), self.experts))  # redundant copies included
        wanted = self.local_slots(phy2log, owners)
        missing = sorted({e for e in wanted if e not in held})
        with ThreadPoolExecutor(max(1, min(READ_THREADS, len(missing)))) as pool:  # safetensors reads: mmap
            read = dict(zip(missing, pool.map(lambda e: read_expert(self.layer, e), missing)))
        stack = ExpertStack.from_experts([held[e] if e in held else read[e] for e in wanted])
        if "native" in self.plan.backends:
            stack.packed_for_native()  # the native loops' copy too, off the compute thread
        return stack

    def switch(self, phy2log: list[int], stack: ExpertStack, owners: list[int] | None = None) -> None:
        """Take a staged placement (between steps, on every rank at the same step)."""
        if owners is not None:
            self.set_owners(owners)
        self.set_placement(phy2log)
        self.use_stack(stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]; every rank of the group calls it at every MoE layer, T may be 0.
        (The overlapped schedule calls the three parts itself, see overlap.py.)"""
        sends, routing = self.prepare(x)
        received = self.exchange(self.layer, "dispatch", sends)
        returned = self.exchange(self.layer, "combine", self.serve(received, x.dtype))
        return self.finish(x, routing, returned) + self.shared(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor | int:
        return self.shared_experts(x) if self.shared_experts is not None and x.shape[0] else 0

    def prepare(self, x: torch.Tensor) -> tuple[list[bytes], tuple]:
        """Gate and route x [T, D] -> (one dispatch payload per rank, what finish needs)."""
        num_tokens = x.shape[0]
        if num_tokens:
            weights, ids = self.gate(x)  # [T, K]
        else:
            k = self.gate.top_k
            weights, ids = torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        if self.expert_load is None:
            self.expert_load = torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device)
        self.expert_load += expert_counts(ids, self.num_experts)
        top_k = ids.shape[1]
        slots = self.log2phy[ids, self.replicas(ids)]  # [T, K] physical slots
        dest = self.owner[slots]
        sends, sent_pairs = [], []
        for r in range(self.size):
            mask = dest == r  # [T, K]
            tokens = mask.any(dim=1).nonzero().flatten()  # each token once per rank
            self.dispatched[r] += tokens.numel()
            position = torch.full((num_tokens,), -1, dtype=torch.long)
            position[tokens] = torch.arange(tokens.numel())
            t_idx, k_idx = mask.nonzero(as_tuple=True)  # pairs, in flat (token, k) order
            sends.append(encode_dispatch(x[tokens], position[t_idx], self.local_index[slots[t_idx, k_idx]],
                                         self.wire))
            sent_pairs.append(t_idx * top_k + k_idx)
        return sends, (weights, ids, sent_pairs)

    def serve(self, received: list[bytes], dtype: torch.dtype) -> list[bytes]:
        """The tokens every rank dispatched here -> their expert outputs, one combine payload each."""
        sources = [r for r, raw in enumerate(received) if raw]  # ranks out of the group send nothing
        outputs = self.compute_experts([decode_dispatch(received[r], dtype) for r in sources])
        sends = [b""] * len(received)
        for r, y in zip(sources, outputs):
            sends[r] = encode_combine(y, self.wire)
        return sends

    def finish(self, x: torch.Tensor, routing: tuple, returned: list[bytes]) -> torch.Tensor:
        """The expert outputs back from every rank -> the routed part of the layer's output [T, D]."""
        weights, ids, sent_pairs = routing
        num_tokens, top_k = ids.shape
        ys = torch.empty(num_tokens * top_k, x.shape[1], dtype=x.dtype)  # [T*K, D] by flat pair
        for flat, raw in zip(sent_pairs, returned):
            if flat.numel():  # (a rank out of the group was sent no pairs and returns nothing)
                ys[flat] = decode_combine(raw).to(x.dtype)
        # NOTE: MoE.routed_grouped's combine: with the exact wire every EP size sums what EP 1 sums
        rows = torch.arange(num_tokens * top_k).view(num_tokens, top_k)
        return combine(ys, rows, ids, weights).to(x.dtype)

    def replicas(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T, K] -> which replica of its expert each pair uses: the n-th pair of an expert goes
        to replica (n + rank) mod its replica count, so replicas share an expert's load to within
        one pair, and ranks start at different replicas."""
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = expert_counts(flat, self.num_experts)
        first = counts.cumsum(0) - counts  # [E] where each expert's run starts in the sorted order
        nth = torch.empty_like(flat)
        nth[order] = torch.arange(flat.numel()) - first[flat[order]]
        return ((nth + self.rank) % self.logcnt[flat]).view(ids.shape)

    def compute_experts(self, inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Per source rank (x [N, D], pair_token [P], pair_slot [P]) -> its outputs [P, D], every
        slot's tokens from all sources run as one batch."""
        xs = torch.cat([x[tok] for x, tok, _ in inputs]) if inputs else torch.empty(0)
        slot = torch.cat([s for _, _, s in inputs])
        order = slot.argsort(stable=True)
        backend = self.plan.choose(-(-slot.numel() // self.gate.top_k))
        # (the per-pair reference has no meaning for pairs from several ranks: one expert at a time)
        ys = run_experts("loop" if backend == "reference" else backend, xs[order],
                         expert_counts(slot, len(self.stack)), self.stack)
        out = torch.empty_like(ys)
        out[order] = ys
        return list(out.split([tok.numel() for _, tok, _ in inputs]))


def moe_layers(model: DeepseekV3) -> list[int]:
    """The MoE layers: the main model's, then the MTP layer's (index num_hidden_layers)."""
    return [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, (MoE, EPMoE))]


def local_experts(phy2log: list[list[int]], moe_layer_ids: list[int], rank: int, size: int,
                  members: list[int] | None = None) -> dict[int, set[int]]:
    """layer -> the logical experts this rank's slots hold (what its loader reads)."""
    out = {}
    for layer, row in zip(moe_layer_ids, phy2log):
        owners = member_owners(len(row), size, members)
        out[layer] = {row[slot] for slot, r in enumerate(owners) if r == rank}
    return out


def base_owners(num_slots: int, size: int) -> list[int]:
    """Every rank up: rank r holds slots [r*S, (r+1)*S)."""
    per_rank = num_slots // size
    return [slot // per_rank for slot in range(num_slots)]


def member_owners(num_slots: int, size: int, members: list[int] | None = None) -> list[int]:
    """The owners map of a group re-formed with `members` only: a member keeps its own slots, and
    the slots of the ranks out of the group go, in order, each to the member holding fewest so far
    (the lower rank on a tie). Every rank computes the same map from the same members."""
    owners = base_owners(num_slots, size)
    if members is None or set(members) == set(range(size)):
        return owners
    if not members:
        raise ValueError("a group needs at least one member")
    held = {m: owners.count(m) for m in members}
    for slot, rank in enumerate(owners):
        if rank not in held:
            owners[slot] = min(held, key=lambda m: (held[m], m))
            held[owners[slot]] += 1
    return owners


def keep_tensor(local: dict[int, set[int]]) -> Callable[[str], bool]:
    """A loader filter: routed-expert tensors of other ranks' experts are not read. Layers the
    placement does not cover (the MTP layer's, run whole on each rank for now) are read whole."""
    def keep(name: str) -> bool:
        m = EXPERT_TENSOR.match(name)
        return m is None or int(m.group(1)) not in local or int(m.group(2)) in local[int(m.group(1))]
    return keep


def apply_expert_parallel(model: DeepseekV3, rank: int, size: int, phy2log: list[list[int]], exchange: Exchange,
                          wire: str = "fp8") -> list[EPMoE]:
    """Replace every MoE layer by its EP form; phy2log [MoE layers][slots] (design: EPLB's)."""
    layers = moe_layers(model)
    if len(phy2log) != len(layers):
        raise ValueError(f"the placement covers {len(phy2log)} MoE layers; the model has {len(layers)}")
    out = []
    for layer, row in zip(layers, phy2log):
        if len(row) % size:
            raise ValueError(f"layer {layer}: {len(row)} slots do not split over {size} ranks")
        block = model.model.layers[layer]
        block.mlp = EPMoE(block.mlp, layer, rank, size, row, exchange, wire)
        out.append(block.mlp)
    return out


@torch.inference_mode()
def idle_forward(model: DeepseekV3) -> None:
    """A rank without work still joins every exchange of the group's step, with zero tokens (it
    computes its experts for the others)."""
    empty = torch.empty(0, model.args.hidden_size, dtype=model.dtype)
    for block in model.main_layers:
        if isinstance(block.mlp, EPMoE):
            block.mlp(empty)


