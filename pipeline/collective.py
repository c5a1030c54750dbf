"""Process groups of our own between actors: gradient all-reduce for data-parallel learners, weight
broadcast from learner rank 0 to the generators.

Each `Group` is a standalone torch.distributed backend (gloo on CPU, NCCL on GPU) built over its own
`TCPStore` rendezvous, not the process-wide default group: a learner belongs to two groups at once (its
data-parallel peers, and the broadcast group with the generators), and the broadcast group can be rebuilt
after a generator restarts without touching the learners' group. vLLM and OpenRLHF do the same for their
weight-sync groups.

Rendezvous: rank 0 opens the store on a free port (`open_store`), the driver hands its address to the
others, and every member constructs the group at the same time (construction blocks until all joined).
The address is the one other nodes reach this process at: `GroupMember.node_ip`, which the Ray shells
(`actors.shells`) answer with Ray's view of the node; without Ray it is the loopback address.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


DP_GROUP = "learners"      # the K data-parallel learners
SYNC_GROUP = "weights"     # learner rank 0 and every generator


def open_store(world_size: int, timeout_s: float, host: str = "127.0.0.1") -> tuple[dist.TCPStore, str, int]:
    """Rank 0's side of the rendezvous: a store on a free port of `host`. -> (store, host, port)."""
    store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return store, host, store.port


def resolve_backend(backend: str, on_gpu: bool) -> str:
    """The torch.distributed backend: `auto` = NCCL when every member holds its tensors on a GPU, else gloo."""
    if backend == "auto":
        return "nccl" if on_gpu else "gloo"
    return backend


class Group:
    """One process group: `size` members, this one is `rank`. Tensors must live on the backend's device.

    world: make it the process's default group (`torch.distributed.init_process_group`), which FSDP2's
    device mesh needs; only a process in no other default group can (a sharded learner, for its peers)."""

    def __init__(self, host: str, port: int, rank: int, size: int, backend: str = "gloo",
                 timeout_s: float = 60.0, store: dist.TCPStore | None = None, world: bool = False):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown collective backend {backend!r}; valid: gloo, nccl")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.size, self.backend, self.world = rank, size, backend, world
        if store is None:
            store = dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
        self.store = store                        # rank 0's store must outlive the group
        if world:       # NCCL's default group also carries CPU tensors (offloaded shards) over gloo
            both = "cuda:nccl,cpu:gloo" if backend == "nccl" else backend
            dist.init_process_group(both, store=store, rank=rank, world_size=size, timeout=timeout)
            self.pg = dist.distributed_c10d._get_default_group()
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, size, opts)

    def mesh(self, device_type: str):
        """The group as FSDP2's 1-D device mesh (a `world` group only)."""
        from torch.distributed.device_mesh import DeviceMesh

        if not self.world:
            raise RuntimeError("Group.mesh(): build the group with world=True")
        return DeviceMesh.from_group(dist.group.WORLD, device_type)

    def close(self) -> None:
        if self.world and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """In place: every member ends with the elementwise sum over members."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self.pg.allreduce([tensor], opts).wait()

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        """In place: every member ends with root's tensor."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()


def all_reduce_grads(group: Group, params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the group, in one flat buffer per dtype (few large messages).

    A member without a gradient for a parameter adds zeros; a parameter no member has a gradient for keeps
    `grad=None`, as on a single learner (so the optimizer skips it, weight decay included).
    """
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for ps in by_dtype.values():
        present = [float(p.grad is not None) for p in ps]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
                         + [torch.tensor(present, dtype=ps[0].dtype, device=ps[0].device)])
        group.all_reduce_sum_(flat)
        offset = 0
        for p, anyone in zip(ps, flat[-len(ps):].tolist()):
            n = p.numel()
            if anyone == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            else:
                p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n


# ------------------------------------------------------------------------------ weight broadcast

def weights_spec(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of every tensor of a state dict, in order: what a receiver allocates."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def _flat_groups(spec: list[tuple[str, tuple, str]]) -> dict[str, list[tuple[str, tuple]]]:
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, shape, dtype in spec:
        groups.setdefault(dtype, []).append((name, shape))
    return groups


def _header(version: int, checksum: str) -> torch.Tensor:
    """Version and checksum as one int64 tensor, so receivers can verify what they got."""
    digest = bytes.fromhex(checksum)
    return torch.tensor([version, len(digest), *digest], dtype=torch.int64)


def send_weights(group: Group, state: dict[str, torch.Tensor], version: int, checksum: str) -> int:
    """Rank 0 side: header, then one flat buffer per dtype of `state` (the weights as the generators hold
    them). Returns bytes sent per receiver."""
    device = next(iter(state.values())).device
    group.broadcast_(_header(version, checksum).to(device))
    sent = 0
    for dtype, entries in _flat_groups(weights_spec(state)).items():
        flat = torch.cat([state[name].detach().reshape(-1) for name, _ in entries])
        group.broadcast_(flat)
        sent += flat.numel() * flat.element_size()
    return sent


def receive_weights(group: Group, spec: list[tuple[str, tuple, str]], device: str | torch.device = "cpu"
                    ) -> tuple[int, str, dict[str, torch.Tensor]]:
    """Receiver side of `send_weights`. -> (version, sender's checksum, state dict to load).

    The state dict's tensors are views of the received buffers; the caller checks version and checksum.
    """
    header = torch.zeros(2 + 16, dtype=torch.int64, device=device)
    group.broadcast_(header)
    header = header.cpu().tolist()
    version, n = header[0], header[1]
    checksum = bytes(header[2:2 + n]).hex()
    state = {}
    for dtype, entries in _flat_groups(spec).items():
        sizes = [int(torch.Size(shape).numel()) for _, shape in entries]
        flat = torch.empty(sum(sizes), dtype=getattr(torch, dtype), device=device)
        group.broadcast_(flat)
        for (name, shape), part in zip(entries, flat.split(sizes)):
            state[name] = part.view(shape)
    return version, checksum, state


class GroupMember:
    """Mixin for the plain classes behind actors that join process groups, by group name."""

    def node_ip(self) -> str:
        """The address other members reach this process at (the Ray shells answer with the node's)."""
        return "127.0.0.1"

    def open_store(self, name: str, size: int, timeout_s: float = 60.0) -> tuple[str, int]:
        """As rank 0 of group `name`: open its rendezvous. -> (host, port) for the other members."""
        store, host, port = open_store(size, timeout_s, self.node_ip())
        self.__dict__.setdefault("_stores", {})[name] = store
        return host, port

    def join_group(self, name: str, host: str, port: int, rank: int, size: int, backend: str = "gloo",
                   timeout_s: float = 60.0, world: bool = False) -> None:
        """Blocks until every member joined. Rank 0 calls `open_store` first. world: see `Group`."""
        store = self.__dict__.get("_stores", {}).pop(name, None) if rank == 0 else None
        self.leave_group(name)
        self.__dict__.setdefault("groups", {})[name] = Group(host, port, rank, size, backend, timeout_s, store,
                                                             world)

    def leave_group(self, name: str) -> None:
        group = self.__dict__.get("groups", {}).pop(name, None)
        if group is not None:
            group.close()

    def group(self, name: str) -> Group | None:
        return self.__dict__.get("groups", {}).get(name)
