"""Split slot tables: which arm serves which session, and how the table changes. Pure.

A session belongs to slot ``slot_of(hash) = (low 32 bits of its hash) mod SLOTS``, where the
hash is ``HOTPATH.hash(session key)`` (``h-`` + 16 hex digits: the last 8 are the low 32
bits). The Lua filter computes it from the key, the control plane from the access log's
``session_hash``, so both agree on every session's slot. A table is a string of ``SLOTS``
characters, one arm index (hex digit) per slot.

``derive(previous, weights, ...)`` is the one rule for changing a table:

- targets: each arm's share of the ``SLOTS`` slots, by largest remainder (ties: lower arm
  first), so the shares are exact to one slot in a thousand;
- no previous table: contiguous ranges in arm order (arm 0 has slots 0..t0-1, ...);
- otherwise only arms over their target give slots, only arms under it take them, and
  exactly ``min(surplus, movable)`` slots leave each giving arm: no slot moves between two
  arms that both keep or both gain, and no more move than the new weights need;
- the slots that leave an arm are its highest ones, chosen without looking at traffic (with
  two arms the table a change ends at is the same whatever the traffic was); a leaving
  slot that is *active* (a session in it was served within its pool's session TTL) stays
  until it is idle, unless its arm is gone (pool deleted): the table is short of its target
  meanwhile, and the next derive moves the rest;
- weights all zero among the arms that are left (every arm's pool deleted): None, the
  split has no arm and answers 503.

Freed slots, lowest first, go to the taking arms in arm order. Everything is
deterministic, so every control plane derives the same table from the same inputs.

A slot is idle only when every session in it is: with ``n`` active sessions spread over
``SLOTS`` slots a slot is idle with probability ``exp(-n / SLOTS)``, so far above ~5,000
sessions active at once a leaving slot can wait long (docs/splits.md).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from control_plane.config.model import SLOT_DIGITS, Split, SplitSlots

# Slots per table: 1,000 (0.1% per slot) keeps the route metadata at ~1 KB per split and a
# 1% share within one slot's tenth; the Lua filter takes the table's length, so only this
# constant decides it.
SLOTS = 1000


def slot_of(session_hash: str, slots: int = SLOTS) -> int:
    """The slot of a session from its hash (``h-`` + 16 hex digits): the low 32 bits (the
    last 8 hex digits) mod ``slots``. ValueError for anything else."""
    if len(session_hash) != 18 or not session_hash.startswith("h-"):
        raise ValueError(f"not a session hash: {session_hash!r}")
    return int(session_hash[10:], 16) % slots


def targets(weights: Sequence[int], slots: int = SLOTS) -> list[int]:
    """Each arm's slot count for ``weights`` (sum > 0), by largest remainder."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    exact = [w * slots for w in weights]
    counts = [e // total for e in exact]
    left = slots - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] % total), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def initial_table(weights: Sequence[int], slots: int = SLOTS) -> str:
    return "".join(SLOT_DIGITS[i] * n for i, n in enumerate(targets(weights, slots)))


def derive(previous: Sequence[int | None] | None, weights: Sequence[int],
           active: Collection[int] = (), gone: Collection[int] = (), slots: int = SLOTS
           ) -> str | None:
    """The new table for ``weights``, from ``previous`` (per slot, the arm index, or None
    where the slot's arm was removed from the split); ``active`` slots keep their arm
    unless the arm is in ``gone`` (its pool was deleted: give it weight 0). None when no
    weight is positive."""
    if sum(weights) <= 0:
        return None
    if previous is None:
        return initial_table(weights, slots)
    if len(previous) != slots:
        raise ValueError(f"a table has {slots} slots, got {len(previous)}")
    arms = len(weights)
    want = targets(weights, slots)
    owner = [a if a is not None and a < arms else None for a in previous]
    count = [0] * arms
    for a in owner:
        if a is not None:
            count[a] += 1
    free: list[int] = [s for s in range(slots) if owner[s] is None]  # arm gone: must move
    for arm in range(arms):
        surplus = count[arm] - want[arm]
        if surplus <= 0:
            continue
        # The slots that leave are the arm's highest ``surplus`` ones, whatever the traffic;
        # the active among them wait (and are the highest again next time).
        leaving = [s for s in range(slots - 1, -1, -1) if owner[s] == arm][:surplus]
        given = [s for s in leaving if arm in gone or s not in active]
        for s in given:
            owner[s] = None
        count[arm] -= len(given)
        free.extend(given)
    free.sort()
    deficits = [max(0, want[a] - count[a]) for a in range(arms)]
    position = 0
    for arm in range(arms):
        for _ in range(deficits[arm]):
            if position == len(free):
                break
            owner[free[position]] = arm
            position += 1
    # Slots of a gone arm left over (every taking arm full, which cannot happen as counts
    # sum to ``slots``): keep the table total by giving them to the heaviest arm.
    heaviest = max(range(arms), key=lambda a: (weights[a], -a))
    return "".join(SLOT_DIGITS[heaviest if a is None else a] for a in owner)


def decode(table: str) -> list[int]:
    return [SLOT_DIGITS.index(c) for c in table]


def mapped(stored: SplitSlots | None, split: Split, slots: int = SLOTS
           ) -> list[int | None] | None:
    """The stored table in terms of ``split``'s arms: each slot's arm index by pool (None
    where the stored arm is no longer in the split). None when there is no usable table."""
    if stored is None or len(stored.table) != slots:
        return None
    index = {pool: i for i, pool in enumerate(split.pools)}
    by_digit = [index.get(pool) for pool in stored.pools]
    return [by_digit[SLOT_DIGITS.index(c)] for c in stored.table]


def effective_weights(split: Split, pools: Collection[str]) -> list[int]:
    """Arm weights with arms whose pool does not exist at 0 (degraded)."""
    return [arm.weight if arm.pool in pools else 0 for arm in split.arms]


def gone_arms(split: Split, pools: Collection[str]) -> set[int]:
    """Arms whose pool does not exist (the split is degraded while there are any)."""
    return {i for i, arm in enumerate(split.arms) if arm.pool not in pools}


def serving_table(split: Split, stored: SplitSlots | None, pools: Collection[str],
                  slots: int = SLOTS) -> str | None:
    """The table Envoy uses now, the same on every control plane: the leader's stored table
    (or, before it wrote one, the initial table of the weights), with only the slots of arms
    that are gone (pool deleted, arm removed) moved at once to the arms under their target.
    Weight changes wait for the leader (``leader_table``), which knows the active sessions.
    None: no arm left (503)."""
    weights = effective_weights(split, pools)
    previous = mapped(stored, split, slots)
    if previous is None:
        return derive(None, weights, slots=slots)
    if sum(weights) <= 0:
        return None
    # Every slot of a live arm counts as active: only the gone arms' slots move.
    return derive(previous, weights, active=range(slots), gone=gone_arms(split, pools),
                  slots=slots)


def leader_table(split: Split, stored: SplitSlots | None, pools: Collection[str],
                 active: Collection[int], slots: int = SLOTS) -> str | None:
    """The table the leader writes: the stored one moved toward the weights, active slots
    left alone (None: no arm left)."""
    # First the repair every control plane makes (gone arms' slots), then the move toward
    # the weights: a slot repaired by serving_table is not moved again.
    serving = serving_table(split, stored, pools, slots)
    if serving is None:
        return None
    weights = effective_weights(split, pools)
    return derive(decode(serving), weights, active=active, slots=slots)


def shares(table: str, arms: int) -> list[float]:
    """Each arm's share of the slots (of sessions, for evenly spread keys)."""
    counts = [0] * arms
    for c in table:
        counts[SLOT_DIGITS.index(c)] += 1
    return [n / len(table) for n in counts] if table else [0.0] * arms
