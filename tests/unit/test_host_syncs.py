"""No host read inside a micro-batch: the trainer's forward_backward_step keeps the loss, the finite flag and the
per-clip losses on the device; the one read is at the optimizer step's boundary, and metrics are read at log steps.

On a GPU, tests/gpu/test_cuda_hot_path.py runs the step under torch.cuda.set_sync_debug_mode("error"). Here, on the
CPU, every tensor-to-host read made from Kino's trainer code (train/) during a real micro-batch is counted.
"""
import inspect
from types import SimpleNamespace

import pytest
import torch

from conf.schema import load_config
from data.batch import ConsumerSnapshot, PackedBatch, PreparedClip
from models.autoencoder import build_autoencoder
from models.dit import TextToVideoModel, text_conditioner
from models.flops import parameter_groups
from train.rng import RNGState
from train.trainer import Trainer
from train.sequence_parallel import SequenceLayout

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class Engine:
    """The model and its backward, as DeepSpeed's engine exposes them (DeepSpeed's own step is not Kino's code)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args):
        return self.model(*args)

    def backward(self, loss):
        loss.backward()


@pytest.fixture
def counted_reads(monkeypatch):
    """Reads made by code in train/, except through train.rng.host_values (which refuses device tensors)."""
    reads = []
    repo_train = str(__import__("train").__path__[0])
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_filename.startswith(repo_train) and caller.f_code.co_name != "host_values":
                reads.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


def micro_batch(count=3):
    g = torch.Generator().manual_seed(0)
    clips = [PreparedClip(torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8, generator=g), f"a red circle {i}",
                          f"k{i}", "s.tar", {}, 8 * 4 * 4, (0, 0, i)) for i in range(count)]
    return PackedBatch(clips, [], "rank0-worker0", ConsumerSnapshot(stage=[]))


def bare_trainer(cfg):
    """The trainer's state that forward_backward_step reads, on one CPU process, with no DeepSpeed."""
    from train.curriculum import Curriculum

    model = TextToVideoModel(cfg.model)
    trainer = SimpleNamespace(env=SimpleNamespace(device=torch.device("cpu")), rng=RNGState(0, 0), cfg=cfg,
                              model=model, autoencoder=build_autoencoder(cfg.model.autoencoder),
                              text=text_conditioner(cfg.model), engine=Engine(model),
                              flop_groups=parameter_groups(model), layout=SequenceLayout(1, 0, 1), split=None,
                              curriculum=Curriculum(cfg.curriculum), step=0)
    trainer.latents = lambda batch: Trainer.latents(trainer, batch)
    trainer.text_batch = lambda batch, captions: Trainer.text_batch(trainer, batch, captions)
    trainer.image_tokens = lambda batch, given: Trainer.image_tokens(trainer, batch, given)
    trainer.frame_conditions = lambda batch, given, x0: Trainer.frame_conditions(trainer, batch, given, x0)
    return trainer


@pytest.mark.parametrize("conditioning", [["curriculum=demo", "model.frame_conditioning=false"],
                                         ["curriculum=demo", "model.frame_conditioning=true",
                                          "curriculum.stages.0.conditioning.text=0.5",
                                          "+curriculum.stages.0.conditioning.first_frame=0.5"]],
                         ids=["text", "conditioning frames"])
def test_a_micro_batch_reads_nothing_back_to_the_host(counted_reads, conditioning):
    cfg = load_config(["experiment=demo", "model.attention_backend=sdpa", *conditioning])
    trainer = bare_trainer(cfg)
    model = trainer.model
    batch = micro_batch()
    counted_reads.clear()
    result = Trainer.forward_backward_step(trainer, batch)
    assert counted_reads == []
    assert isinstance(result.loss_sum, torch.Tensor) and isinstance(result.finite, torch.Tensor)
    assert result.per_sample_loss.shape == (3,)
    assert any(p.grad is not None for p in model.parameters())


def test_the_count_sees_a_read_from_trainer_code_and_host_values_refuses_device_tensors(counted_reads):
    from train.collectives import all_reduce_values
    from train.rng import host_values

    counted_reads.clear()
    all_reduce_values([1.0, 2.0], torch.device("cpu"))  # reads its result back: a host read made in train/
    assert len(counted_reads) == 1 and "collectives.py" in counted_reads[0]
    with pytest.raises(ValueError, match="synchronise"):
        host_values(torch.zeros(2, device="meta"))
