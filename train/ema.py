"""Exponential moving average of the trained weights, partitioned like the optimizer's fp32 master weights.

Each rank keeps the EMA of the fp32 pieces of the trainable parameters that its optimizer updates (ZeRO-3: its
partition of each parameter; ZeRO-1/2 and bf16 at stage 0: its fragments of the flat fp32 partition; fp32 at
stage 0, where every rank holds every weight: a 1/world slice of each), so an update reads only local memory and
gathers nothing, and the EMA costs 4 bytes a trainable parameter / world size. Frozen parameters (LoRA's base)
have no EMA: they never move, and the consolidated EMA takes them from the model.

A piece is named by its parameter and its range in the flattened parameter, so a checkpoint written by N ranks
(one file per rank, step_N/ema/) restores on M: each rank copies from every saved piece the part that overlaps
its own. `consolidate` assembles the whole EMA, one parameter at a time, where it is used: the in-loop evaluation
and video generation (a collective, only when they run) and train.export / train.generate (from the files).

The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so a short run's EMA follows
training instead of staying near the initial weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

FORMAT = "kino-ema-shards-1"


@dataclass
class Piece:
    """The fp32 master weights of parameter `name`, elements [start, stop) of it flattened, as one rank holds
    them. `master` returns the live fp32 view the optimizer updates."""
    name: str
    start: int
    stop: int
    shape: Tuple[int, ...]
    master: Callable[[], torch.Tensor]


def local_pieces(module: torch.nn.Module, rank: int, world_size: int) -> List[Piece]:
    """This rank's pieces of the trainable parameters of `module` (inside a DeepSpeed engine, after it is built)."""
    pieces = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition, padded at the end of the last one
            from deepspeed.utils import safe_get_local_fp32_param

            size = p.ds_tensor.ds_numel
            start = dist.get_rank(group=p.ds_process_group) * size
            stop = min(start + size, p.ds_numel)
            shape = tuple(p.ds_shape)
            master = (lambda p=p, n=stop - start: safe_get_local_fp32_param(p).view(-1)[:n])
        elif getattr(p, "_hp_mapping", False) is not False:  # ZeRO-1/2, BF16_Optimizer: linked fp32 fragments
            mapping = p._hp_mapping
            if mapping is None:  # this rank's partition holds none of it
                continue
            start = mapping.lp_fragment_address.start
            stop = start + mapping.lp_fragment_address.numel
            shape = tuple(p.shape)
            master = (lambda m=mapping: m.get_hp_fragment().view(-1))
        else:  # fp32 without ZeRO: every rank holds the whole parameter; each averages a slice
            chunk = math.ceil(p.numel() / world_size)
            start, stop = min(rank * chunk, p.numel()), min((rank + 1) * chunk, p.numel())
            shape = tuple(p.shape)
            master = (lambda p=p, a=start, b=stop: p.detach().view(-1)[a:b])
        if stop > start:
            pieces.append(Piece(name, start, stop, shape, master))
    return pieces


class EMA:
    def __init__(self, pieces: List[Piece], decay: float):
        self.decay = decay
        self.updates = 0
        self.pieces = pieces
        self.shadow: Dict[str, torch.Tensor] = {p.name: p.master().detach().float().clone() for p in pieces}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Local: no collective (every rank calls it after each applied step)."""
        weight = 1.0 - self.current_decay()
        for piece in self.pieces:
            self.shadow[piece.name].lerp_(piece.master().float(), weight)
        self.updates += 1

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.shadow.values())

    # -- checkpoints: one file per rank (train/checkpoint.py, scope "sharded") ---------------------------
    def state_dict(self) -> Dict[str, object]:
        return {"format": FORMAT, "updates": self.updates,
                "pieces": {p.name: {"start": p.start, "stop": p.stop, "shape": list(p.shape),
                                    "values": self.shadow[p.name].cpu()} for p in self.pieces}}

    def load_state_dict(self, files: List[Path]) -> None:
        """Restore from the files of a checkpoint's ranks (any number of them), or from an older checkpoint's
        whole ema.pt: each saved piece's overlap with each of this rank's pieces. Every element of this rank's
        pieces must be found exactly once."""
        filled = {name: 0 for name in self.shadow}
        updates = None
        for path in files:
            saved = read_ema_file(path)
            updates = saved["updates"] if updates is None else updates
            for name, entry in saved["pieces"].items():
                if name not in self.shadow:
                    continue
                filled[name] += self._copy_overlap(name, entry)
        wrong = {name: n for name, n in filled.items() if n != self.shadow[name].numel()}
        if wrong:
            name = sorted(wrong)[0]
            raise ValueError(f"the checkpoint's EMA does not match the model: {len(wrong)} parameter(s) not restored "
                             f"whole, such as {name} ({wrong[name]} of {self.shadow[name].numel()} elements found)")
        self.updates = int(updates or 0)

    def _copy_overlap(self, name: str, entry: Dict) -> int:
        piece = next(p for p in self.pieces if p.name == name)
        lo, hi = max(piece.start, entry["start"]), min(piece.stop, entry["stop"])
        if hi <= lo:
            return 0
        values = entry["values"].reshape(-1)
        self.shadow[name][lo - piece.start:hi - piece.start].copy_(values[lo - entry["start"]:hi - entry["start"]])
        return hi - lo


def read_ema_file(path: Path) -> Dict:
    """One rank's EMA file, or an older checkpoint's whole ema.pt ({"updates", "weights": {name: tensor}}) read as
    one piece per parameter."""
    saved = torch.load(path, map_location="cpu", mmap=True)
    if saved.get("format") == FORMAT:
        return saved
    return {"updates": saved["updates"],
            "pieces": {name: {"start": 0, "stop": t.numel(), "shape": list(t.shape), "values": t}
                       for name, t in saved["weights"].items()}}


def saved_pieces(files: Iterable[Path]) -> Iterator[Tuple[str, Dict]]:
    for path in files:
        yield from read_ema_file(path)["pieces"].items()


def consolidate_files(files: List[Path], base: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The whole EMA from a checkpoint's EMA files (offline: train.export, train.generate): each averaged
    parameter assembled from its pieces, every other parameter as `base` holds it (the raw weights, where some are
    frozen: a frozen parameter's EMA is its value)."""
    weights = dict(base)
    assembled: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name, entry in saved_pieces(files):
        if name not in assembled:
            shapes[name] = tuple(entry["shape"])
            numel = math.prod(entry["shape"])
            assembled[name], counts[name] = torch.empty(numel, dtype=torch.float32), 0
        assembled[name][entry["start"]:entry["stop"]] = entry["values"].reshape(-1)[:entry["stop"] - entry["start"]]
        counts[name] += entry["stop"] - entry["start"]
    for name, flat in assembled.items():
        if counts[name] != flat.numel():
            raise ValueError(f"the EMA files hold {counts[name]} of {flat.numel()} elements of {name}")
        weights[name] = flat.reshape(shapes[name])
    return weights


@torch.no_grad()
def consolidated(module: torch.nn.Module, ema: EMA, device: torch.device,
                 release: bool = False) -> Iterator[Tuple[str, Optional[torch.Tensor]]]:
    """Collective: every rank runs it to the end. (name, whole fp32 EMA) for each parameter of `module`, one at
    a time, on rank 0 (None elsewhere): an averaged parameter summed from the ranks' disjoint pieces; a frozen one
    as `module` holds it (gathered under ZeRO-3). `release`: each rank drops its piece once it is summed (the end
    of a run: the EMA then exists only where it was consolidated)."""
    from train.collectives import sum_onto_main
    from train.engine import gathered

    pieces = {p.name: p for p in ema.pieces}
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    main = not distributed or dist.get_rank() == 0
    for name, p in module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if p.requires_grad:
            flat = torch.zeros(math.prod(shape), dtype=torch.float32, device=device)
            if name in pieces:
                piece = pieces[name]
                if ema.shadow[name].numel() != piece.stop - piece.start:
                    raise RuntimeError(f"the EMA of {name} was released at the end of the run: it consolidates once")
                flat[piece.start:piece.stop] = ema.shadow[name]
                if release:
                    ema.shadow[name] = ema.shadow[name].new_empty(0)
            sum_onto_main(flat)
            value = flat.reshape(shape)
        else:
            with gathered([p]):
                value = p.detach().float().clone() if main else None
        yield name, value if main else None


def consolidate_into(target: Optional[torch.nn.Module], module: torch.nn.Module, ema: EMA,
                     device: torch.device, release: bool = False) -> None:
    """Collective. Copy the whole EMA into `target` on the rank that passes one (rank 0; None elsewhere);
    `release` as in `consolidated`."""
    into = dict(target.named_parameters()) if target is not None else {}
    with torch.no_grad():
        for name, value in consolidated(module, ema, device, release):
            if target is not None:
                into[name].copy_(value)
