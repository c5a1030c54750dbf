"""Gathering sharded actor calls when an actor may die mid-call.

Generators and scorers are started with `max_restarts=-1`: Ray restarts a dead one (its constructor runs
again), and the call that was in flight fails with `RayActorError`. `gather` then lets the caller restore
the actor's state (a generator gets the current weights again) and sends the same shard again, so the
step completes with every sample exactly once. Tasks to one actor run in submission order, so the
restore call always lands before the resent shard.

Why not RLlib's `FaultTolerantActorManager`: it requires the actor classes to inherit its `FaultAwareApply`
and route calls through `apply(lambda)`, which imports RLlib (about 6 s and 200 MB) in every actor
process; its answer to a failed call is to mark the actor unhealthy and return the error, leaving the
re-dispatch of the shard, the part that matters here, to the caller anyway.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError


@dataclass
class ShardCall:
    actor: Any            # an actor handle
    method: str           # the remote method to call
    args: tuple           # its arguments (object refs allowed)


class ActorLost(RuntimeError):
    """An actor did not come back: the shard could not be completed within the time limit."""


def gather(calls: list[ShardCall], restore: Optional[Callable[[Any], None]] = None,
           timeout_s: float = 120.0) -> tuple[list, int]:
    """Results of all calls, in order, and how many calls had to be resent.

    A call whose actor died is resent (after `restore`) until `timeout_s` has passed; while Ray reports
    the actor as restarting, the resend waits with a growing back-off.
    """
    refs = [getattr(c.actor, c.method).remote(*c.args) for c in calls]
    try:
        return ray.get(refs), 0                     # the common case: one gather, nothing died
    except RayActorError:
        pass
    results, resent = [], 0
    deadline = time.monotonic() + timeout_s
    for call, ref in zip(calls, refs):
        backoff_s = 0.1
        while True:
            try:
                results.append(ray.get(ref))
                break
            except RayActorError as err:
                if time.monotonic() > deadline:
                    raise ActorLost(f"{call.method}: the actor did not come back within {timeout_s:g} s "
                                    f"({err})") from err
                if isinstance(err, ActorUnavailableError):   # restarting: give it time
                    time.sleep(backoff_s)
                    backoff_s = min(2 * backoff_s, 2.0)
                if restore is not None:
                    restore(call.actor)             # queued before the resent call on the restarted actor
                ref = getattr(call.actor, call.method).remote(*call.args)
                resent += 1
    return results, resent
