"""New weights from the learners to every generator after each update, verified.

`WeightSync` owns the whole state of it: the policy version the generators hold, the transport, the
broadcast group's health, the cached object-store packet a restarted generator is given, and the count of
fallbacks. Transports (`resources.weight_sync`):
- `collective`: learner rank 0 broadcasts over a gloo/NCCL group ("weights": rank 0 and every generator),
  version and checksum first; each generator loads the weights, reads back the checksum of what it now
  holds and refuses a mismatch. A member's death makes that step go through the object store, and the group
  is rebuilt (with the restarted generator) at the next sync.
- `object_store`: a checksummed packet through Ray; each generator checks the bytes that arrived and the
  checksum of what it holds after loading them.
Either way the driver also checks that every generator answers the same checksum (and, with the
broadcast, the learner's). Every wait has a timeout (`resources.collective_timeout_s`, the gather's).
"""
from __future__ import annotations

from typing import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.learner_group import LearnerGroup
from actors.pools import connect_group
from actors.resilient import ActorLost, ShardCall, get_all
from pipeline.collective import SYNC_GROUP, resolve_backend
from pipeline.config import RunConfig


class WeightSync:
    def __init__(self, cfg: RunConfig, learners: LearnerGroup, generators: list, gather: Callable,
                 version: int = 0):
        self.cfg, self.learners, self.generators = cfg, learners, generators
        self._gather = gather                 # the driver's fault-tolerant gather (counts resent shards)
        self.version = version                # the policy version every generator holds
        self.collective = cfg.resources.weight_sync == "collective"
        self.group_ok = False                 # the broadcast group is formed and every member still in it
        self.packet, self.packet_version = None, -1   # ref to the latest object-store packet, made on demand
        self.spec = None                      # ref to the (name, shape, dtype) list receivers allocate
        self.fallbacks = 0                    # syncs whose broadcast failed and used the object store

    def connect(self) -> None:
        """(Re)build the broadcast group: learner rank 0 and every generator, in that rank order."""
        m, r = self.cfg.model, self.cfg.resources
        gpu = m.device != "cpu" and r.gpus_per_learner > 0 and r.gpus_per_rollout_worker > 0
        self.group_ok = False
        connect_group(SYNC_GROUP, [self.learners.rank0, *self.generators], resolve_backend(r.collective_backend, gpu),
                      r.collective_timeout_s)
        self.group_ok = True

    def sync(self) -> dict[str, float]:
        """After the learners' update: the new version to every generator. -> metrics."""
        target = self.version + 1
        stats = {"sync/collective": 0.0, "sync/fallbacks": float(self.fallbacks)}
        if self.collective:
            try:
                if not self.group_ok:
                    self.connect()
                sent, checksums = self._broadcast(target)
                self.version = target
                check_same(checksums + [sent["checksum"]], target)
                return {**stats, "sync/collective": 1.0, "sync/bytes": float(sent["bytes"]),
                        # rank 0's seconds to gather (sharded), cast, checksum and send, per GiB sent
                        "sync/s_per_gib": sent["seconds"] / max(sent["bytes"] / 2**30, 1e-12)}
            except (RayActorError, RayTaskError, ActorLost) as err:
                self.group_ok = False
                self.fallbacks += 1
                stats["sync/fallbacks"] = float(self.fallbacks)
                print(f"weights version {target}: broadcast failed ({type(err).__name__}); sending them through "
                      "the object store and rebuilding the group at the next sync")
        self._make_packet(target)
        checksums = self._gather([ShardCall(g, "set_weights", (self.packet,)) for g in self.generators],
                                 self.restore_generator)
        self.version = target
        check_same(checksums, target)
        return stats

    def _broadcast(self, version: int) -> tuple[dict, list[str]]:
        if self.spec is None:
            self.spec = ray.put(self.learners.weights_spec())
        send = self.learners.submit_broadcast()
        receive = [g.receive_weights.remote(SYNC_GROUP, self.spec, version) for g in self.generators]
        sent, *checksums = get_all([send, *receive])
        return sent, checksums

    def _make_packet(self, version: int) -> None:
        if self.packet is None or self.packet_version != version:
            self.packet = self.learners.export_weights()      # kept: a restarted generator needs it
            self.packet_version = version

    def restore_generator(self, gen) -> None:
        """A restarted generator loaded the initial weights: give it the current ones before its shard is
        resent, and wait for it (left on version 0 it would generate stale rollouts). It left the broadcast
        group by dying, so the group is rebuilt at the next sync."""
        self.group_ok = False
        if self.version == 0:
            return                                          # it loaded version 0 itself
        self._make_packet(self.version)
        try:
            ray.get(gen.set_weights.remote(self.packet))
        except RayTaskError:
            raise             # the weights are gone with their learner (or arrived corrupt): a checkpoint restores
        except RayActorError:
            pass              # the generator died again: gather resends the shard and restores once more

    def resume(self, version: int) -> None:
        """After the learners loaded a checkpoint at `version`: every generator gets those weights."""
        self.version = version
        self._make_packet(version)
        checksums = self._gather([ShardCall(g, "set_weights", (self.packet,)) for g in self.generators],
                                 self.restore_generator)
        check_same(checksums, version)


def check_same(checksums: list[str], version: int) -> None:
    if len(set(checksums)) != 1:
        raise RuntimeError(f"weights version {version}: after the sync the generators and the learner hold "
                           f"different weights: {checksums}")
