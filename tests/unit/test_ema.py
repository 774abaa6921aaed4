import torch

from train.ema import EMA


def test_ema_follows_a_short_run_and_restores_exactly():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)
    # with warm-up the EMA has nearly reached the trained weights; a fixed 0.999 decay would be at ~18%
    assert (ema.shadow["weight"] - 1.0).abs().max() < 0.01
    restored = EMA(torch.nn.Linear(3, 3), decay=0.999)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 200 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    ema.update(model), restored.update(model)
    assert torch.equal(restored.shadow["bias"], ema.shadow["bias"])
