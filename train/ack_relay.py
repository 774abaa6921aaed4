"""A node's acknowledgements in one call to the data coordinator.

Every data-parallel rank acknowledges what each optimizer step trained. Sent by each rank, that is one actor call per
rank and step: at 16,384 ranks 2.9 s of the actor's time for every step (BENCHMARKS.md, "Data coordinator at
scale"), more than half of a 5 s step. Here the data-parallel leaders of a node gather their acknowledgements to
the node's first leader over a gloo group of their own (local, no GPU), and that rank sends them in one `ack_step`:
the actor's load becomes one call per node and step. Consumers stay named as they were (rank x loader worker), so
each acknowledgement still renews its own consumer's leases.

A node is a host name: the ranks say theirs to each other once, when the relay is built (launchers differ in how
they deal ranks to nodes, and in the variables they set for it).
"""
from __future__ import annotations

import socket
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist


def node_leaders(hosts: Sequence[str], degree: int) -> List[List[int]]:
    """The data-parallel leaders (first rank of each sequence-parallel group) of each node, in order of each node's
    first rank. `hosts`: every rank's host name, by rank."""
    nodes: Dict[str, List[int]] = {}
    for rank in range(0, len(hosts), degree):
        nodes.setdefault(hosts[rank], []).append(rank)
    return list(nodes.values())


class AckRelay:
    """Collective to build (every rank creates every node's group, as torch.distributed requires)."""

    def __init__(self, rank: int, world_size: int, degree: int, enabled: bool = True):
        self.rank = rank
        self.group = None
        self.members: Sequence[int] = (rank,)
        if not enabled or not dist.is_initialized() or world_size == 1:
            return
        hosts: List[Optional[str]] = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname())
        for leaders in node_leaders(hosts, degree):
            if len(leaders) < 2:
                continue
            group = dist.new_group(leaders, backend="gloo")
            if rank in leaders:
                self.group, self.members = group, leaders

    @property
    def sender(self) -> bool:
        """This rank sends its node's acknowledgements."""
        return self.rank == self.members[0]

    def gather(self, tags: Dict[str, List[Sequence[int]]]) -> Optional[Dict[str, List[Sequence[int]]]]:
        """Collective over the node's leaders: on the sender, every leader's {consumer: tags} merged; None on the
        others (their acknowledgements travel in the sender's call)."""
        if self.group is None:
            return tags
        gathered: Optional[List] = [None] * len(self.members) if self.sender else None
        dist.gather_object(tags, gathered, dst=self.members[0], group=self.group)
        if not self.sender:
            return None
        merged: Dict[str, List[Sequence[int]]] = {}
        for part in gathered:
            for consumer, consumer_tags in part.items():
                merged.setdefault(consumer, []).extend(consumer_tags)
        return merged
