"""The all-to-all of an expert-parallel group: one interface, an in-process hub and Redis streams.

Every rank of a group calls `all_to_all(key, sends)` with the same sequence of keys; `sends[p]` goes
to rank p and the call returns `recv`, where `recv[p]` is what rank p sent under that key. Several
keys may be in flight at once (two overlapped micro-batches). A rank's own slot never crosses the
wire. A rank that does not send within the timeout raises ExchangeTimeout on the others.

Redis (`RedisTransport`)
- Each rank reads one inbox stream, `streams.ep_inbox(role, group_id, rank)`, with one background
  task (blocking XREAD, no consumer group) that files payloads into per-key mailboxes, wakes the
  waiter, and deletes what it read (XDEL, pipelined with its next XREAD): inboxes stay bounded.
- Sending is one pipelined round trip: an XADD to each peer's inbox.
- Entry fields: `t` kind (b"d" data, b"h" hello, b"r" reply to a hello), `s` source rank, `i`
  incarnation of the source; data adds `d` the incarnation of the destination as the source knows
  it, `k` key, `p` payload; a hello or reply adds `a` the incarnation of the destination it knows
  (b"" when none yet) and `n` the group size.

Join handshake (`start`); it also re-forms the group after a rank restarts:
1. Each transport draws a random incarnation id; its reader drains its inbox from the first entry,
   so nothing sent before it ran is lost, and leftovers of earlier runs are read once and deleted.
2. Until every peer has joined, `start` sends HELLO(a = the peer's incarnation as far as we know it)
   to the peers still missing, again every HELLO_INTERVAL_S.
3. A reader records the sender's incarnation of every HELLO or REPLY (a changed one means the peer
   restarted: its half-filled mailbox slots are dropped) and marks the sender joined when `a` is its
   own incarnation; it answers each HELLO (never a REPLY) with a REPLY, so the exchange terminates.
4. `start` returns when every peer is joined: we know its incarnation and it knows ours. Only a live
   peer can acknowledge a fresh random id, so stale HELLOs can never complete a join.
5. Data is accepted only when `i` is the sender's known incarnation and `d` is ours: entries left by,
   or addressed to, an earlier incarnation or run are dropped (`stats.dropped_stale`).
After a rank restarts, the survivors' readers answer its HELLOs; a survivor calls `start()` again to
wait until the newcomer has joined before its next exchange. One live process per rank is assumed.

Members: a group re-formed without a dead rank (shared/ep/membership.py) exchanges among its
`members` only (`set_members`): nothing is sent to the others, nothing awaited from them, and
their slot of `recv` is b"".
"""
from shared.ep.transport.base import ExchangeTimeout, Transport, TransportStats
from shared.ep.transport.inprocess import InProcessHub, InProcessTransport
from shared.ep.transport.redis_streams import RedisTransport

__all__ = ["ExchangeTimeout", "InProcessHub", "InProcessTransport", "RedisTransport", "Transport", "TransportStats"]
