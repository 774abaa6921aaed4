"""The typed data the loader hands the trainer: prepared clips, drops, packed batches, and the snapshot
that lets a consumer resume exactly where its last trained batch left it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from data.coordinator import Tag

# A sample's place, as snapshots store it (JSON): [epoch, chunk, offset, shard file].
Entry = List[Any]


@dataclass
class PreparedClip:
    """One licensed sample, decoded and fitted to its bucket, ready to pack."""

    video: torch.Tensor  # uint8 (frames, height, width, 3)
    caption: str
    key: str
    shard: str  # the shard's file name
    meta: Dict[str, Any]
    tokens: int
    tag: Tag
    # From a latent cache (data.latents): `video` holds the latents (C, T, H, W float) instead of frames, and a
    # pretrained text encoder's caption embeddings (tokens, dim) come with them.
    text_embedding: Optional[torch.Tensor] = None
    # From a latent cache of a run with model.image (Wan 2.1 I2V): CLIP's tokens of the clip's first and last frames
    # (2, tokens, dim), which the clip's given frames read in place of its pixels (models/image_encoder.py).
    image_embedding: Optional[torch.Tensor] = None
    # From a latent cache of a run whose model reads diffusers' I2V pipeline's inputs (model.image.inputs=pipeline):
    # the encodings its given first and/or last frame condition on, (C, T + 2, H, W) (models/conditioning.py
    # cached_conditions).
    condition: Optional[torch.Tensor] = None

    @property
    def encoded(self) -> bool:
        return self.video.is_floating_point()

    def entry(self) -> Entry:
        return [*self.tag, self.shard]


@dataclass(frozen=True)
class Drop:
    """A sample that must not reach the model, and why (a reason of data/loader.py or the license gate)."""

    tag: Tag
    reason: str
    key: str


@dataclass
class ChunkPosition:
    """The chunk a consumer is reading (the coordinator's work item) and the next offset in it."""

    work: Dict[str, Any]
    next: int

    @property
    def finished(self) -> bool:
        return self.next >= self.work["stop"]


@dataclass
class ConsumerSnapshot:
    """A consumer's state after a batch: enough to re-create, on resume, every sample it had read but the
    trainer had not yet trained, in the same order.

    stage   -- the stage's token budget and buckets; a new stage re-buckets what was buffered
    pending -- batches the packer closed together with this one, not yet handed out
    buffer  -- samples read and waiting in the packer (or still to be re-read), in order
    current -- the chunk being read and the next offset in it (None between chunks)
    """

    stage: List[Any]
    pending: List[List[Entry]] = field(default_factory=list)
    buffer: List[Entry] = field(default_factory=list)
    current: Optional[ChunkPosition] = None

    def to_dict(self) -> Dict[str, Any]:  # the JSON form a checkpoint stores
        current = None if self.current is None else {"work": self.current.work, "next": self.current.next}
        return {"stage": self.stage, "pending": self.pending, "buffer": self.buffer, "current": current}

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "ConsumerSnapshot":
        current = state.get("current")
        return cls(stage=state["stage"], pending=[[list(e) for e in batch] for batch in state["pending"]],
                   buffer=[list(e) for e in state["buffer"]],
                   current=None if current is None else ChunkPosition(dict(current["work"]), int(current["next"])))

    def chunks(self) -> Set[Tuple[int, int]]:
        """The (epoch, chunk)s whose unread samples this snapshot holds: a resume replays them from here."""
        held = {(e[0], e[1]) for batch in self.pending for e in batch} | {(e[0], e[1]) for e in self.buffer}
        if self.current is not None:
            held.add((self.current.work["epoch"], self.current.work["chunk"]))
        return held

    def rebucketed(self) -> "ConsumerSnapshot":
        """For a new stage: the closed batches go back into packing, in order, ahead of the buffer."""
        return ConsumerSnapshot(self.stage, [], [e for batch in self.pending for e in batch] + self.buffer,
                                self.current)


@dataclass
class PackedBatch:
    """One micro-batch of clips of mixed shapes, at most the stage's token budget, from one consumer.

    `dropped` lists every sample the consumer dropped since its previous batch: the trainer audits and
    acknowledges them together with the step that trains this batch. A batch may hold drops alone.
    """

    clips: List[PreparedClip]
    dropped: List[Drop]
    consumer: str  # "rank{r}-worker{w}": acknowledgements in its name renew its leases
    snapshot: ConsumerSnapshot
    # False: this rank runs the batch through forward and backward with a zero loss weight, to keep the step's
    # collectives in lockstep, and trains it later (data.strict_epochs: its epoch waits for an older one).
    trains: bool = True

    def pin_memory(self) -> "PackedBatch":
        """Called by the DataLoader (pin_memory=True): the clips in page-locked memory, so the trainer's copy to the
        GPU is asynchronous."""
        for clip in self.clips:
            clip.video = clip.video.pin_memory()
        return self

    @property
    def videos(self) -> List[torch.Tensor]:
        return [c.video for c in self.clips]

    @property
    def captions(self) -> List[str]:
        return [c.caption for c in self.clips]

    @property
    def keys(self) -> List[str]:
        return [c.key for c in self.clips]

    @property
    def shards(self) -> List[str]:
        return [c.shard for c in self.clips]

    @property
    def meta(self) -> List[Dict[str, Any]]:
        return [c.meta for c in self.clips]

    @property
    def tags(self) -> List[Tag]:
        return [c.tag for c in self.clips]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.clips)

    @property
    def epoch(self) -> int:
        """The newest epoch of its clips (with data.strict_epochs, the one epoch they all belong to)."""
        return max(c.tag[0] for c in self.clips)

    @property
    def dropped_tags(self) -> List[Tag]:
        return [d.tag for d in self.dropped]
