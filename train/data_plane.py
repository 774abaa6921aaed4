"""The trainer's one door to the data. `DataPlane.next_batch` hands out the next micro-batch of a stage and
`DataPlane.settle` is told which batches an optimizer step trained. Between the two it owns everything the data
side keeps: the coordinator client, the loaders and their snapshots, acknowledgements and the trainer's own record
of them (the plan mirror), provenance, the license audit and the dataset checks of a resume. Its resumable pieces
come from `resumable_state`, saved and restored by the CheckpointManager with the trainer's own."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from conf.schema import KinoConfig
from data.batch import ConsumerSnapshot, Drop, PackedBatch
from data.coordinator import CoordinatorUnavailable, connect_coordinator, mirrored_state
from data.latent_cache import run_roots, stage_root
from data.licenses import Audit, LicensePolicy
from data.loader import dataset_fingerprint, dataset_rows, make_loader, stage_spec
from data.storage import location
from train.ack_relay import AckRelay
from train.checkpoint import ResumeRefused
from train.collectives import MIN, all_reduce, gather_objects
from train.curriculum import Curriculum
from train.epoch_gate import NO_EPOCH, EpochGate
from train.provenance import NONFINITE_STEP, ProvenanceLog
from train.sequence_parallel import SequenceLayout, share_batch
from train.state import Resumable, Value

log = logging.getLogger("kino")


class NothingToTrain(RuntimeError):
    """A stage whose every sample is dropped (too short for its buckets, no allowed license, unreadable)."""


class DatasetChanged(ResumeRefused):
    """A resume onto shards that changed since the checkpoint, without data.allow_changed_dataset."""


class DataPlane:
    def __init__(self, cfg: KinoConfig, rank: int, layout: SequenceLayout, curriculum: Curriculum, run_dir: Path,
                 checkpoints, resume_path: Optional[Path], pin_memory: bool):
        self.cfg, self.layout, self.curriculum = cfg, layout, curriculum
        self.is_main = rank == 0
        self.checkpoints = checkpoints  # its `universal`: the checkpoint resumed from came from another world size
        self.resume_path = resume_path
        self.pin_memory = pin_memory
        self.policy = LicensePolicy.from_ids(cfg.data.licenses.allow)
        self.audit = Audit(policy=sorted(self.policy.allow))
        # The shards the plan deals, read once: the coordinator's plan, the mirror of it and the checkpoint's
        # fingerprint all stand on these rows. One consumer per data-parallel group: only its leader reads.
        self.plan_rows = dataset_rows(self.plan_root)
        self.dataset_samples = sum(count for _, count in self.plan_rows)
        self.coordinator = connect_coordinator(cfg.data, self.plan_rows, run_dir, rank, layout.data_world)
        # An in-process coordinator has one rank and no calls to save; a Ray actor hears from each node once a step.
        self.ack_relay = AckRelay(rank, layout.world_size, layout.degree, enabled=self.coordinator.uses_ray)
        self.ack_calls = 0
        self.provenance = ProvenanceLog(run_dir, rank, cfg.train.record_sample_keys, layout.world_size)
        self.loader_snapshots: Dict[str, ConsumerSnapshot] = {}  # consumer -> after its last trained batch
        self._saved_num_workers: Optional[int] = None  # of the checkpoint resumed from
        self._saved_sequence: Optional[int] = None
        self._dataset_changed = False
        # The acknowledged data state lives here too, not only in the coordinator's actor: the plan as of the last
        # checkpoint (rank 0) and what each rank acknowledged since. A final checkpoint needs no live actor.
        self._plan_base: Optional[Dict[str, Any]] = None
        self._acked_since: List[List[int]] = []
        self._coordinator_lost = False
        self._plan_mirrored = False
        self._iterator = None
        self._iterator_stage: Optional[int] = None
        self._pending_drops: Dict[str, List[Drop]] = {}  # consumer -> drops since its last batch with clips
        self._drops_in_row: List[Drop] = []
        workers = max(1, cfg.data.num_workers)
        self.gate = EpochGate(f"rank{layout.data_rank}-worker{w}" for w in range(workers)) \
            if cfg.data.strict_epochs else None
        self._empty_captions: Dict[str, Any] = {}  # each latent cache's, loaded on first use

    # -- where a stage reads -----------------------------------------------------------------------
    @property
    def plan_root(self) -> str:
        """The source whose shard rows the plan deals: the first stage's (every source the run reads holds the
        same shards and sample counts, checked before start: data/latent_cache.py check_sources)."""
        return run_roots(self.cfg)[0]

    def stage_root(self, stage_index: int) -> str:
        """Where a stage reads: its latent cache, the run's (data.latents), or the videos (data.root)."""
        return stage_root(self.cfg, self.curriculum.stages[stage_index])

    def describe_source(self, stage_index: int) -> str:
        root = self.stage_root(stage_index)
        return f"videos from {root}" if root == self.cfg.data.root else f"latents from the cache {root}"

    def empty_caption(self, stage_index: int):
        """The empty caption's text embedding in the stage's latent cache: what a dropped caption trains on."""
        cache = self.stage_root(stage_index)
        if cache not in self._empty_captions:
            from data.latent_cache import load_npy

            raw = (location(cache) / "empty_caption.npy").read_bytes()
            self._empty_captions[cache] = torch.from_numpy(load_npy(raw))
        return self._empty_captions[cache]

    @property
    def dropped(self) -> Dict[str, int]:
        return self.audit.dropped

    # -- batches -----------------------------------------------------------------------------------
    def begin_step(self, step: int, device) -> None:
        """Collective, at the start of optimizer step `step` (data.strict_epochs): the ranks agree on the oldest
        epoch any of them still has to train; this step trains no newer one (train/epoch_gate.py)."""
        if self.gate is None:
            return
        epoch = NO_EPOCH
        if self.layout.is_leader:
            self._switch_stage(step)
            self._fill_gate()
            epoch = self.gate.oldest_epoch()
        if self.layout.world_size > 1:
            epoch = int(all_reduce(torch.tensor([epoch], dtype=torch.int64), device, MIN).item())
        self.gate.floor = epoch

    def next_batch(self, step: int) -> PackedBatch:
        """The next micro-batch of `step`'s stage, holding clips. The drops its consumer reported since its last
        batch come with it, settled (audited and acknowledged) with the step that trains it. With
        data.strict_epochs a batch may come marked `trains=False`: its epoch waits for an older one elsewhere, so it
        runs with a zero loss weight and comes again later. Under sequence parallelism the group's leader reads it
        and the other members receive its clips' metadata (their pixels stay with the leader, which encodes)."""
        if not self.layout.is_leader:
            return share_batch(None, self.layout)
        self._switch_stage(step)
        if self.gate is None:
            return share_batch(self._fetch(), self.layout)
        self._fill_gate()
        return share_batch(self.gate.take(), self.layout)

    def _switch_stage(self, step: int) -> None:
        stage_index = self.curriculum.stage_index(step)
        if self._iterator is None or self._iterator_stage != stage_index:
            # A new stage re-buckets: its loader starts from the old one's snapshots, re-reading what was
            # buffered (now fitted to the new buckets) and continuing the same chunks. What was fetched and not
            # trained is read again from there.
            self._iterator = None
            self._pending_drops.clear()
            self._drops_in_row = []
            if self.gate is not None:
                self.gate.clear()
            self._iterator, self._iterator_stage = self._loader_for_stage(stage_index), stage_index

    def _fill_gate(self) -> None:
        """Until every consumer of this rank has a batch waiting: only then is the oldest of them known."""
        while self.gate.wanting():
            try:
                self.gate.put(self._fetch())
            except StopIteration:  # the loaders ended (no more work can be dealt): what is queued still goes out
                return

    def _fetch(self) -> PackedBatch:
        """The loader's next batch with clips, carrying every drop its consumer reported since its last one."""
        while True:
            batch = next(self._iterator)
            pending = self._pending_drops.setdefault(batch.consumer, [])
            pending += batch.dropped
            if batch.clips:
                batch.dropped, self._pending_drops[batch.consumer] = pending, []
                self._drops_in_row = []
                return batch
            self._drops_in_row += batch.dropped
            # Every sample of the data dropped in a row, each seen at least once (a rank reads a share of each
            # epoch: only distinct samples prove the stage can train on nothing, not a run of bad chunks).
            dropped = self._drops_in_row
            if len({d.tag[1:] for d in dropped}) >= self.dataset_samples:  # (chunk, offset): one sample
                stage = self.curriculum.stages[self._iterator_stage]
                reasons = Counter(d.reason for d in dropped)
                raise NothingToTrain(
                    f"stage {stage.name!r} can train on nothing: every sample was dropped, {len(dropped)} in a row "
                    f"({', '.join(f'{r}={n}' for r, n in reasons.most_common())}; the data holds "
                    f"{self.dataset_samples}). Check the stage's buckets against the clips' durations and sizes "
                    f"(python -m data inspect {self.cfg.data.root}) and data.licenses.allow")

    def _loader_for_stage(self, stage_index: int):
        cfg, stage = self.cfg, self.curriculum.stages[stage_index]
        spec = stage_spec(cfg, stage, self.stage_root(stage_index), self.policy, self.coordinator,
                          rank=self.layout.data_rank, world_size=self.layout.data_world,
                          num_workers=cfg.data.num_workers, pack_window=cfg.data.pack_window,
                          pack_tolerance=cfg.data.pack_tolerance, strict_epochs=cfg.data.strict_epochs,
                          image_fraction=stage.image_fraction,
                          resume=dict(self.loader_snapshots), pin_memory=self.pin_memory)
        return iter(make_loader(spec))

    def close(self) -> None:
        """Stop the loaders (their workers exit)."""
        self._iterator = None

    def settle(self, step: int, batches: List[PackedBatch], trained: bool) -> None:
        """After optimizer step `step` (1-based): audit, provenance, and acknowledgement to the coordinator, each
        batch in the name of the consumer (rank x loader worker) that read it, which keeps that consumer's leases
        alive. Under sequence parallelism a group's leader read its batches and settles them."""
        if not self.layout.is_leader:
            return
        tags = defaultdict(list)
        for batch in batches:
            self.loader_snapshots[batch.consumer] = batch.snapshot
            for drop in batch.dropped:
                self.audit.record_dropped(drop.reason, drop.key)
            tags[batch.consumer] += batch.dropped_tags + batch.tags
            self.provenance.record(step, batch, trained)
            if trained:
                for clip in batch.clips:
                    meta = clip.meta
                    self.audit.record_trained(clip.shard, meta["license"], meta["rights_holder"], meta["source_url"])
            else:
                for key in batch.keys:
                    self.audit.record_dropped(NONFINITE_STEP, key)
        for acknowledged in tags.values():
            self._acked_since += [list(tag) for tag in acknowledged]  # the mirror's record, for the checkpoint
        node_tags = self.ack_relay.gather(dict(tags))  # collective over the node's leaders, every step
        if self._coordinator_lost or not node_tags:
            return
        try:  # one call per node and step, for all of its ranks and workers: the actor's load grows with steps
            self.coordinator.ack_step(node_tags)
            self.ack_calls += 1
        except CoordinatorUnavailable as error:
            self._note_coordinator_lost(error)

    def coordinator_report(self) -> Optional[str]:
        """Collective. What the data plan did, for the run's closing summary (None if the coordinator is gone)."""
        calls = sum(gather_objects(self.ack_calls))
        if not self.is_main or self._coordinator_lost:
            return None
        try:
            summary = self.coordinator.summary()
        except CoordinatorUnavailable:
            return None
        return (f"{summary['completed_epochs']} epoch(s) completed, open {summary['open_epochs']}; "
                f"{calls} acknowledgement call(s) this launch ({len(self.ack_relay.members)} rank(s) a call)")

    def merged_audit(self) -> Audit:
        """Collective: the audit of all ranks together."""
        merged = Audit(policy=sorted(self.policy.allow))
        for state in gather_objects(self.audit.state_dict()):
            merged = merged.merge(Audit.from_state(state))
        return merged

    # -- resumable state ---------------------------------------------------------------------------
    def resumable_state(self, audit_context: Callable[[], Dict[str, Any]]) -> Dict[str, Resumable]:
        """The data side's pieces of a checkpoint, in the order a resume restores them: the layout that wrote
        it and the dataset check come before the plan, which decides whether the loaders continue where they stood.
        `audit_context()`: what the trainer adds to audit.json (its step, the base model)."""
        return {
            "num_workers": Resumable(Value(lambda: self.cfg.data.num_workers, self._note_saved_workers), "shared"),
            "sequence": Resumable(Value(lambda: self.layout.degree, self._note_saved_sequence), "shared"),
            # How the degree was made (a record: any split of the same degree deals the data alike)
            "sequence_degrees": Resumable(Value(lambda: {"ulysses": self.layout.ulysses, "ring": self.layout.ring},
                                                None), "shared"),
            "dataset": Resumable(Value(self.dataset_fingerprints, self.check_dataset), "shared"),
            # a file of its own: sized by chunks, it stays out of train_state.json and of any Ray object
            "data": Resumable(Value(self._data_plan, self._restore_data_plan), "file", "data_plan.json"),
            "loaders": Resumable(Value(lambda: {k: v.to_dict() for k, v in self.loader_snapshots.items()},
                                       self._restore_loaders), "rank"),
            "audit": Resumable(Value(lambda: self._audit_so_far(audit_context()), self._restore_audit), "file",
                               "audit.json"),
        }

    def resume(self, step: int) -> None:
        """After a checkpoint's pieces are restored: provenance past its step will be trained again."""
        self.provenance.resume(step)

    def dataset_fingerprints(self) -> Dict[str, Any]:
        """The shards the plan deals (names and counts) and each source's files: a takedown or rebuild of any of
        them changes these."""
        return {"plan": hashlib.sha256(json.dumps(sorted(self.plan_rows)).encode()).hexdigest(),
                "sources": {root: dataset_fingerprint(root) for root in run_roots(self.cfg)}}

    def check_dataset(self, saved) -> None:
        """Every rank: the same shards as the checkpoint's, or data.allow_changed_dataset."""
        if saved is None:
            return
        current = self.dataset_fingerprints()
        now = current["sources"]
        if isinstance(saved, str):  # written when a run read one source: one of today's must be it
            changed = [] if saved in now.values() else list(now)
        else:
            # A source read then must be as it was. A video root under a new path (data.root may move) must be one
            # of the sources read then; a cache new to the run holds the plan's shards (below) and was checked
            # against its videos before start.
            was = saved["sources"]
            changed = [root for root, print_ in now.items()
                       if was.get(root, print_) != print_
                       or (root not in was and root == self.cfg.data.root and print_ not in was.values())]
            if not changed and saved.get("plan", current["plan"]) != current["plan"]:
                changed = list(now)  # the data plan's shards or counts differ
        if not changed:
            return
        if not self.cfg.data.allow_changed_dataset:
            raise DatasetChanged(
                f"the dataset {', '.join(changed)} changed since {self.resume_path} was written (its shards differ: "
                f"a takedown or a rebuild). Resume with data.allow_changed_dataset=true to re-plan the epoch over "
                f"the current shards, or start fresh (train.resume=false)")
        self._dataset_changed = True
        if self.is_main:
            log.warning("the dataset %s changed since %s was written (data.allow_changed_dataset=true): the data "
                        "plan starts a new epoch over the current shards; samples trained earlier in the "
                        "interrupted epoch may be trained again, removed ones never", ", ".join(changed),
                        self.resume_path)

    def _note_saved_workers(self, num_workers) -> None:
        self._saved_num_workers = self.cfg.data.num_workers if num_workers is None else int(num_workers)

    def _note_saved_sequence(self, degree) -> None:
        self._saved_sequence = 1 if degree is None else int(degree)  # written before sequence parallelism: 1

    def _same_data_layout(self) -> bool:
        """Same ranks, sequence-parallel groups and loader workers as the checkpoint: each loader continues
        exactly where it stood."""
        return (not self.checkpoints.universal and self._saved_num_workers == self.cfg.data.num_workers
                and self._saved_sequence == self.layout.degree and not self._dataset_changed
                and not self._plan_mirrored)

    def _data_plan(self):
        """Collective. The acknowledged samples of every rank. Rank 0 asks the coordinator; when it cannot be
        reached (a stop signal took its Ray cluster down too) the plan is rebuilt from the mirror: the plan at the
        last checkpoint plus every rank's acknowledgements since (`mirrored_state`)."""
        gathered = gather_objects((list(self._acked_since), self._coordinator_lost))
        self._acked_since = []
        if not self.is_main:
            return None
        state = None
        # A rank that lost it sent none of its (or, relaying, its node's) acknowledgements since: only the mirror
        # holds them all.
        if not any(lost for _, lost in gathered):
            try:
                state = self.coordinator.state()
            except CoordinatorUnavailable as error:
                self._note_coordinator_lost(error)
        if state is None:
            data = self.cfg.data
            state = mirrored_state(self.plan_rows, data.seed, data.chunk_samples, self._plan_base,
                                   [tag for tags, _ in gathered for tag in tags])
            log.warning("data plan for this checkpoint rebuilt by the trainer (the coordinator is gone): a resume "
                        "deals the rest of the epoch out anew, each sample still trained once")
        self._plan_base = state
        return state

    def _note_coordinator_lost(self, error) -> None:
        if not self._coordinator_lost:
            log.warning("%s: the trainer's own record of acknowledged samples stands in for it", error)
        self._coordinator_lost = True

    def _restore_data_plan(self, state) -> None:
        # A plan the trainer rebuilt has no deal: every loader starts over on what is left (all ranks must know).
        self._plan_mirrored = bool(state and state.get("mirrored"))
        if not self.is_main or self._dataset_changed:  # changed shards: the fresh plan over them stands
            return
        self._plan_base = state
        same = self._same_data_layout()
        workers = max(1, self.cfg.data.num_workers)
        self.coordinator.restore(state, self.layout.data_world * workers if same else None)
        if not same:
            log.info("resuming on %d data-parallel group(s) of %d rank(s) x %d worker(s) where the checkpoint had "
                     "another layout: the rest of the epoch is dealt out anew (each sample still trained once)",
                     self.layout.data_world, self.layout.degree, workers)

    def _restore_loaders(self, snapshots) -> None:
        if self._same_data_layout():  # each loader continues exactly where it stood: bit-exact
            self.loader_snapshots = {k: ConsumerSnapshot.from_dict(v) for k, v in (snapshots or {}).items()}

    def _audit_so_far(self, context: Dict[str, Any]):
        """Collective: the audit of all ranks, merged (rank 0 writes it)."""
        return dict(self.merged_audit().state_dict(), dataset=str(self.cfg.data.root), **context)

    def _restore_audit(self, state) -> None:
        if self.is_main:  # the audit so far, merged over the old ranks, continues on rank 0
            self.audit = Audit.from_state(state)
