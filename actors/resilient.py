"""Gathering sharded actor calls when an actor may die mid-call.

Generators and scorers are started with `max_restarts=-1`: Ray restarts a dead one (its constructor runs
again), and the call that was in flight fails with `RayActorError`. `gather` then lets the caller restore
the actor's state (a generator gets the current weights again) and sends the same shard again, so the
step completes with every sample exactly once. Tasks to one actor run in submission order, so the
restore call always lands before the resent shard.

A failed call is not the only sign of a restart: when an actor dies while none of our calls is in flight
(its node lost between two steps) and Ray has restarted it by the time of our next call, that call runs
in the fresh process without any error, on the state its constructor gave it (a generator's initial
weights). So every shard call is followed by a probe for the worker process that ran it, and a result
counts only if that process is the one whose state we last confirmed (or, after a resend, the one that
also took the restore).

Why not RLlib's `FaultTolerantActorManager`: it requires the actor classes to inherit its `FaultAwareApply`
and route calls through `apply(lambda)`, which imports RLlib (about 6 s and 200 MB) in every actor
process; its answer to a failed call is to mark the actor unhealthy and return the error, leaving the
re-dispatch of the shard, the part that matters here, to the caller anyway.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError


@dataclass
class ShardCall:
    actor: Any            # an actor handle
    method: str           # the remote method to call
    args: tuple           # its arguments (object refs allowed)


class ActorLost(RuntimeError):
    """An actor did not come back: the shard could not be completed within the time limit."""


@dataclass
class Submitted:
    """Shard calls in flight (`submit`), to be collected later (`collect`)."""
    calls: list
    refs: list
    probes: list


def submit(calls: list[ShardCall]) -> Submitted:
    """Send the calls now; their results are collected (and lost shards resent) by `collect`."""
    refs = [getattr(c.actor, c.method).remote(*c.args) for c in calls]
    probes = [_probe(c.actor) for c in calls]       # queued behind each call: the process that ran it
    return Submitted(calls, refs, probes)


def gather(calls: list[ShardCall], restore: Optional[Callable[[Any], None]] = None,
           timeout_s: float = 120.0) -> tuple[list, int]:
    """Results of all calls, in order, and how many calls had to be resent (`collect` of `submit`)."""
    return collect(submit(calls), restore, timeout_s)


def collect(submitted: Submitted, restore: Optional[Callable[[Any], None]] = None,
            timeout_s: float = 120.0) -> tuple[list, int]:
    """Results of submitted calls, in order, and how many calls had to be resent.

    A call whose actor died, or whose result came from a process restarted since we last confirmed its
    state, is resent (after `restore`) until `timeout_s` has passed; while Ray reports the actor as
    restarting, the resend waits with a growing back-off. A call that failed because one of its inputs
    died with another actor (weights exported by a lost learner) raises at once: resending cannot help.
    """
    calls, refs, probes = submitted.calls, submitted.refs, submitted.probes
    try:
        got = ray.get(refs + probes)                # the common case: one gather, nothing died
        results, ran_in = got[:len(calls)], got[len(calls):]
        if all(_confirmed.get(c.actor, p) == p for c, p in zip(calls, ran_in)):
            _confirmed.update(zip((c.actor for c in calls), ran_in))
            return results, 0
    except RayActorError as err:
        _raise_if_input_lost(err)
    results, resent = [], 0
    deadline = time.monotonic() + timeout_s
    for call, ref, probe in zip(calls, refs, probes):
        backoff_s, before = 0.1, None               # before: probe queued ahead of the restore of a resend
        while True:
            try:
                got = ray.get([ref, probe] if before is None else [ref, probe, before])
                expected = _confirmed.get(call.actor, got[1]) if before is None else got[2]
                if got[1] == expected:
                    results.append(got[0])
                    _confirmed[call.actor] = got[1]
                    break
                err = None                          # restarted while idle: the result is from a fresh process
            except RayActorError as e:
                _raise_if_input_lost(e)
                err = e
            if time.monotonic() > deadline:
                raise ActorLost(f"{call.method}: the actor did not come back within {timeout_s:g} s "
                                f"({err or 'it was restarted again'})") from err
            if isinstance(err, ActorUnavailableError):  # restarting: give it time
                time.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, 2.0)
            before = _probe(call.actor)
            if restore is not None:
                restore(call.actor)                 # queued before the resent call on the restarted actor
            ref = getattr(call.actor, call.method).remote(*call.args)
            probe = _probe(call.actor)
            resent += 1
    return results, resent


# The worker process each actor's state was last confirmed in, by handle (weak: a shut-down pool's
# handles drop out). Handles compare by actor id, so the driver's copies of one actor share an entry.
_confirmed: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _probe(actor):
    """Ref to the id of the worker process that runs `actor` (a restart gets a new one) once its earlier
    calls are done. A lambda, so it travels by value: a module-level function would make every scorer
    import this package, which imports torch (a second each)."""
    return actor.__ray_call__.remote(lambda instance: ray.get_runtime_context().get_worker_id())


def get_all(refs: list) -> list:
    """ray.get of all refs; when one actor died, its RayActorError is raised rather than the collective
    error the death caused on its peers (which would hide that an actor must be restarted)."""
    try:
        return ray.get(refs)
    except RayTaskError:
        for ref in refs:
            try:
                ray.get(ref)
            except RayActorError:
                raise
            except RayTaskError:
                pass
        raise


def _raise_if_input_lost(err: RayActorError) -> None:
    """A `RayTaskError` that is a `RayActorError` means the call ran, so its own actor is alive, and failed on
    another actor's death: an argument produced by it (weights exported by a lost learner) holds the error.
    Resending the same arguments would fail the same way; the caller's recovery must handle it."""
    if isinstance(err, RayTaskError):
        raise err
