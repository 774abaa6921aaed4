"""train/ema.py: each rank averages its own pieces of the fp32 master weights; a checkpoint written by N ranks
restores on M, piece by overlapping piece; the whole EMA consolidates from the files."""
import pytest
import torch

from train.ema import EMA, consolidate_files, consolidated, local_pieces


def test_ema_follows_a_short_run_and_restores_exactly(tmp_path):
    model = torch.nn.Linear(3, 3)
    ema = EMA(local_pieces(model, 0, 1), decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update()
    # with warm-up the EMA has nearly reached the trained weights; a fixed 0.999 decay would be at ~18%
    assert (ema.shadow["weight"] - 1.0).abs().max() < 0.01
    restored = EMA(local_pieces(torch.nn.Linear(3, 3), 0, 1), decay=0.999)
    restored.load_state_dict(_files([ema.state_dict()], tmp_path))
    assert restored.updates == 200 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def _files(states, directory):
    """The states as a checkpoint's step_N/ema/ holds them: one file per rank."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, state in enumerate(states):
        paths.append(directory / f"rank_{rank:05d}.pt")
        torch.save(state, paths[-1])
    return paths


def _trained_ranks(world: int, steps: int):
    """`world` ranks' EMAs of one model (every rank holds it whole: stage 0's layout), after `steps` updates
    that move the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    emas = [EMA(local_pieces(model, r, world), 0.9) for r in range(world)]
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        for ema in emas:
            ema.update()
    return model, emas


@pytest.mark.parametrize("saved_world,restored_world", [(3, 2), (2, 3), (1, 4), (4, 1)])
def test_an_ema_saved_by_n_ranks_restores_on_m_exactly(saved_world, restored_world, tmp_path):
    model, saved = _trained_ranks(saved_world, steps=5)
    files = _files([e.state_dict() for e in saved], tmp_path / "saved")
    # each rank's pieces are a slice: together they are the whole model, once
    assert sum(e.numel for e in saved) == sum(p.numel() for p in model.parameters())
    whole = consolidate_files(files, {n: torch.zeros_like(p) for n, p in model.named_parameters()})
    _, reference = _trained_ranks(1, steps=5)
    for name, value in whole.items():
        assert torch.equal(value.reshape(-1), reference[0].shadow[name]), name
        assert not torch.equal(value, dict(model.named_parameters())[name])  # an average, not the weights
    restored = [EMA(local_pieces(model, r, restored_world), 0.9) for r in range(restored_world)]
    for ema in restored:
        ema.load_state_dict(files)
        assert ema.updates == 5
    again = consolidate_files(_files([e.state_dict() for e in restored], tmp_path / "again"),
                              {n: torch.zeros_like(p) for n, p in model.named_parameters()})
    assert all(torch.equal(again[n], whole[n]) for n in whole)


def test_a_restore_that_misses_elements_is_refused(tmp_path):
    model, saved = _trained_ranks(2, steps=1)
    restored = EMA(local_pieces(model, 0, 1), 0.9)
    with pytest.raises(ValueError, match="not restored whole"):
        restored.load_state_dict(_files([saved[0].state_dict()], tmp_path))  # rank 1's file lost


def test_an_older_checkpoints_whole_ema_file_still_restores(tmp_path):
    model, saved = _trained_ranks(1, steps=2)
    old = {"updates": 2, "weights": {n: t.reshape(p.shape).clone() for (n, t), p in
                                     zip(saved[0].shadow.items(), model.parameters())}}
    restored = EMA(local_pieces(model, 1, 2), 0.9)
    restored.load_state_dict(_files([old], tmp_path))
    assert restored.updates == 2
    for piece in restored.pieces:
        assert torch.equal(restored.shadow[piece.name], saved[0].shadow[piece.name][piece.start:piece.stop])


def test_frozen_parameters_have_no_ema_and_consolidate_from_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # LoRA's base: frozen
    ema = EMA(local_pieces(model, 0, 1), 0.9)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    whole = dict(consolidated(model, ema, torch.device("cpu")))
    assert torch.equal(whole["0.weight"], model[0].weight) and torch.equal(whole["1.weight"], model[1].weight)


def test_a_releasing_consolidation_gives_the_same_ema_and_leaves_no_piece_behind():
    """The end of a run (Trainer.release_optimizer_state): each piece is dropped once summed into the whole."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ema = EMA(local_pieces(model, 0, 1), 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    kept = {name: value.clone() for name, value in consolidated(model, ema, torch.device("cpu"))}
    released = dict(consolidated(model, ema, torch.device("cpu"), release=True))
    assert kept.keys() == released.keys() and all(torch.equal(kept[n], released[n]) for n in kept)
    assert all(piece.numel() == 0 for piece in ema.shadow.values())
    with pytest.raises(RuntimeError, match="released"):  # a second consolidation cannot return zeros as the EMA
        dict(consolidated(model, ema, torch.device("cpu")))
