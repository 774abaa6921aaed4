"""One Trainer with named steps, and only the loop: build, resume, forward_backward_step, train_step, checkpoint,
evaluate, generate_videos. The data side (coordinator, loaders, acknowledgements, audit, dataset checks) is one
component, train/data_plane.py: the trainer asks it for the next batch and tells it which batches trained. Every
resumable piece (config check, engine, curriculum, RNG, tracker, EMA and the data plane's own) is listed in
`resumable_state`, one dict of Stateful objects that train/checkpoint.py's CheckpointManager saves and restores
(train/state.py says where each lives)."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from conf.schema import KinoConfig, to_yaml, trajectory_hash
from data.batch import PackedBatch
from models.attention import pin_backend, resolve_backend
from models.autoencoder import build_autoencoder
from models.conditioning import (condition_latents, conditioned_timesteps, conditioning_inputs, draw_given,
                                 pipeline_inputs)
from models.dit import attention_shapes, parameter_count, text_conditioner
from models.flops import flops_per_batch, parameter_groups, peak_flops
from models.image_encoder import clip_picks
from models.flow import noisy_pair, sample_timesteps, shift_timesteps
from train.checkpoint import (CheckpointManager, ResumeRefused, archive_previous_run, changed_config_refusal,
                              latest_checkpoint)
from train.collectives import all_ranks_finite, all_reduce_values
from train.curriculum import Curriculum, stage_shapes
from train.data_plane import DataPlane
from train.ema import EMA, consolidate_into, local_pieces
from train.engine import DistEnv, compute_dtype, global_grad_norm, local_cores_for_main_rank, set_learning_rate
from train.epoch_gate import loss_weighted
from train.evaluate import Evaluator, table as evaluation_table
from train.generate import generate, generation_plan, on_device, write_videos
from train.materialize import build_deferred, materialize
from train.methods import build_model
from train.parallelize import compile_report, compile_wanted, describe_compile, parallelize
from train.preemption import StopRequest
from train.rng import RNGState, host_values
from train.sequence_parallel import per_clip_loss, sequence_layout, sequence_loss, share_latents, share_rng_state
from train.state import Resumable, Value
from train.tracking import StepOutcome, StepResult, StepTotals, Tracker, step_metrics

log = logging.getLogger("kino")


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: KinoConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.stop_request = StopRequest(env.device)  # first: a scheduler may ask to stop during start-up
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        # world = data-parallel groups x parallel.sequence (train/sequence_parallel.py). A group draws one noise:
        # the generators are seeded by the group, so N ranks at SP=N draw what 1 rank at SP=1 does.
        self.layout = sequence_layout(cfg.parallel.sequence, env.rank, env.world_size, cfg.parallel.ring)
        self.rng = RNGState(cfg.train.seed, self.layout.data_rank, env.device)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", env.rank, cfg.train.keep_last,
                                             cfg.train.checkpoint_every)
        # Found before the model is built: a resume under ZeRO-3 builds it partitioned, without initialising it,
        # and a checkpoint from another world size loads through the universal format.
        self._resume_path = self.checkpoints.resume_point(env.world_size) if cfg.train.resume else None
        self.model = self.build_model()
        # Parameters placed where training keeps them, each whole on the host for one moment at most under ZeRO-3
        # (train/materialize.py), with the base weights (model.init_from) read once; their identity is recorded
        # in config.yaml, each checkpoint and audit.json.
        self.base_model = materialize(self.model, cfg, env, fresh=self._resume_path is None)
        self.engine, self.split = parallelize(self.model, cfg, env, self.layout,
                                              load_universal=self.checkpoints.universal)
        self.compiled = compile_wanted(cfg, env.device.type)
        self.compile_report: Optional[Dict[str, Any]] = None
        # Each rank averages its own pieces of the fp32 master weights: no gather, 4 bytes a trained parameter /
        # world size (train/ema.py).
        self.ema = EMA(local_pieces(self.engine.module, env.rank, env.world_size), cfg.train.ema_decay)
        self.curriculum = Curriculum(cfg.curriculum)
        self.data = DataPlane(cfg, env.rank, self.layout, self.curriculum, self.run_dir, self.checkpoints,
                              self._resume_path, pin_memory=env.device.type == "cuda")
        self.stop_request.install()  # after ray.init (in the data plane), which takes SIGTERM over
        self.tracker = Tracker(cfg.tracking, self.run_dir, env.is_main, cfg.train.experiment,
                               self.curriculum.total_steps)
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self._recent_step_time: Optional[float] = None
        self._evaluator: Optional[Evaluator] = None
        self.last_evaluation: Dict[str, float] = {}
        self._training_released = False  # release_optimizer_state: the run is over, its state may go
        peak = cfg.tracking.peak_flops or (peak_flops(torch.cuda.get_device_name(env.device))
                                           if env.device.type == "cuda" else None)
        self.peak_flops = peak
        if env.is_main:
            log.info("model: %s; ZeRO-%d over %d %s process(es)%s", self.describe_model(), cfg.zero.stage,
                     env.world_size, env.device.type,
                     f" in {self.layout.data_world} sequence-parallel group(s) of {self.layout.degree}"
                     + (f" (Ulysses {self.layout.ulysses} x ring {self.layout.ring})" if self.layout.ring > 1 else "")
                     if self.layout.parallel else "")

    # -- what is trained (a subclass trains something else: see train/vae_trainer.py) ----------
    def build_model(self) -> torch.nn.Module:
        cfg, device = self.cfg, self.env.device
        # A forced attention kernel that cannot run this device and precision fails now, not at step 1; `auto`
        # tries the kernels on each of the model's attention shapes now, not inside a forward.
        for shape in attention_shapes(cfg.model):
            backend = resolve_backend(cfg.model.attention_backend, device.type, compute_dtype(cfg), shape)
            if cfg.model.attention_backend == "auto" and dist.is_initialized() and self.env.world_size > 1:
                # A measured choice can differ between ranks (timing noise): every rank takes rank 0's.
                choice = [backend]
                dist.broadcast_object_list(choice, src=0)
                pin_backend("auto", device.type, compute_dtype(cfg), choice[0], shape)
        self.autoencoder = on_device(build_autoencoder(cfg.model.autoencoder), device)
        self.text = on_device(text_conditioner(cfg.model), device)
        model = build_deferred(cfg, fresh=self._resume_path is None)
        self.flop_groups = parameter_groups(model)
        return model

    def describe_model(self) -> str:
        text = self.model.text_encoder
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = parameter_count(self.model)
        lora = self.cfg.model.lora
        return (f"{total / 1e6:.2f}M parameters (DiT {parameter_count(self.model.dit) / 1e6:.2f}M, text encoder "
                f"{parameter_count(text) / 1e6 if text is not None else 0:.2f}M), {trainable / 1e6:.2f}M trainable"
                + (f" ({100 * trainable / total:.2f}%: LoRA rank {lora.rank})" if lora.rank else ""))

    # -- resumable state ---------------------------------------------------------------------------
    def resumable_state(self) -> Dict[str, Resumable]:
        """Every piece of state a checkpoint holds, in the order a resume restores it (collectives in
        state_dict, such as the audit's merge, run in this order on every rank)."""
        pieces = {
            "config": Resumable(Value(lambda: to_yaml(self.cfg), self._check_resumable_config), "file", "config.yaml"),
            "engine": Resumable(self.engine, "engine"),
            "nonfinite_total": Resumable(Value(lambda: self.nonfinite_total, self._set_nonfinite_total), "shared"),
            "curriculum": Resumable(Value(lambda: self.curriculum.state_dict(self.step), self._check_stage), "shared"),
            "tracker": Resumable(self.tracker, "shared"),
            "config_hash": Resumable(Value(lambda: trajectory_hash(self.cfg)), "shared"),
            "base_model": Resumable(Value(lambda: self.base_model, self._restore_base_model), "shared"),
            "rng": Resumable(self.rng, "rank"),
            # the data plan, loader positions, dataset check and audit (train/data_plane.py)
            **self.data.resumable_state(lambda: {"step": self.step, "base_model": self.base_model}),
        }
        pieces["ema"] = Resumable(self.ema, "sharded", "ema")
        return pieces

    def _check_resumable_config(self, saved_yaml: str) -> None:
        refusal = changed_config_refusal(self._resume_path, saved_yaml, self.cfg)
        if refusal:
            raise ResumeRefused(refusal)

    def _restore_base_model(self, identity) -> None:
        if identity:  # the weights came from the checkpoint; their origin is the one it recorded
            self.base_model = identity
            self.cfg.model.init_sha256 = identity["sha256"]

    def _set_nonfinite_total(self, total) -> None:
        self.nonfinite_total = int(total or 0)

    def _check_stage(self, saved) -> None:
        expected = self.curriculum.state_dict(self.step)
        if saved["stage"] != expected["stage"]:
            raise ResumeRefused(f"cannot resume {self._resume_path}: it is in stage {saved['stage']!r} at step {self.step}, "
                               f"the curriculum puts that step in {expected['stage']!r}")

    # -- resume ----------------------------------------------------------------------------------
    def resume(self) -> Optional[Path]:
        path = self._resume_path
        if path is None:
            return None
        # The step comes first: the pieces after it check themselves against it (curriculum stage). The
        # manager writes it with every checkpoint; no piece carries it.
        self.step = self.checkpoints.saved_step(path)
        self.checkpoints.load(path, self.resumable_state())
        share_rng_state(self.rng, self.layout)  # a group draws one noise, whatever layout wrote the checkpoint
        self.data.resume(self.step)
        return path

    # -- one step --------------------------------------------------------------------------------
    def latents(self, batch: PackedBatch) -> List[torch.Tensor]:
        """The micro-batch's clips encoded by the frozen autoencoder, one call per shape. Each clip crosses to the
        device once, as uint8, from pinned memory (the loader pins on CUDA). Under sequence parallelism the
        group's leader encodes and sends the latents to the other members."""
        device = self.env.device
        if not self.layout.is_leader:
            x0 = None
        elif batch.clips and batch.clips[0].encoded:  # from a latent cache: encoded already
            x0 = [v.to(device, non_blocking=True) for v in batch.videos]
        else:
            x0 = self.autoencoder.encode_batch([v.to(device, non_blocking=True) for v in batch.videos])
        return share_latents(x0, self.layout, device)

    def text_batch(self, batch: PackedBatch, captions: List[str]):
        """The captions for the model: their embeddings from the latent cache when it holds them (a dropped caption
        takes the cache's empty-caption embedding), else through the text conditioner."""
        cached = [c.text_embedding for c in batch.clips]
        if not cached or any(e is None for e in cached) or len(cached) != len(captions):
            return self.text.batch(captions, self.env.device)
        from models.layers import cu_seqlens_from_lengths
        from models.text_encoder import TextBatch

        empty = self.data.empty_caption(self.curriculum.stage_index(self.step))
        pieces = [e if caption else empty for e, caption in zip(cached, captions)]
        lengths = [len(p) for p in pieces]
        device = self.env.device
        return TextBatch(None, None, cu_seqlens_from_lengths(lengths, device), max(lengths), lengths,
                         embeddings=torch.cat(pieces).to(device, non_blocking=True))

    def image_tokens(self, batch: PackedBatch, given) -> Optional[torch.Tensor]:
        """Each clip's CLIP tokens for a model with an image branch (model.image: Wan 2.1 I2V), None otherwise: of
        its given first or last frame, read from its pixels or from the latent cache's tokens of them, the black
        image's where none is given (models/image_encoder.py). Under sequence parallelism the group's leader, which
        alone holds the pixels, computes them and sends them to the rest."""
        encoder = getattr(self.text, "image_encoder", None)
        if encoder is None:
            return None
        tokens = None
        if self.layout.is_leader:
            sources = [c.video if c.image_embedding is None else c.image_embedding for c in batch.clips]
            tokens = [encoder.tokens(clip_picks(given, self.cfg.model.image.images, sources))]
        return share_latents(tokens, self.layout, self.env.device)[0]

    def frame_conditions(self, batch: PackedBatch, given, x0) -> Optional[List[torch.Tensor]]:
        """Each clip's condition latents for a model that reads diffusers' I2V pipeline's inputs
        (model.image.inputs=pipeline), None otherwise: the encoding of its given frames with grey elsewhere, from
        its pixels or a latent cache's condition.npy (models/conditioning.py). Under sequence parallelism the
        group's leader, which alone holds the pixels, computes them and sends them to the rest."""
        if not pipeline_inputs(self.cfg.model):
            return None
        conditions = None
        if self.layout.is_leader:
            sources = [c.condition if c.encoded else c.video for c in batch.clips]
            conditions = condition_latents(self.autoencoder, sources, given, [x.shape for x in x0], self.env.device)
        return share_latents(conditions, self.layout, self.env.device)

    def forward_backward_step(self, batch: PackedBatch) -> StepResult:
        device, gen, cfg = self.env.device, self.rng.generator, self.cfg
        x0 = self.latents(batch)
        drop = torch.rand(len(x0), generator=gen) < cfg.data.caption_dropout
        captions = ["" if d else c for d, c in zip(host_values(drop), batch.captions)]
        text = self.text_batch(batch, captions)
        tokens = [math.prod(self.model.dit.grid(x.shape)) for x in x0]
        raw_t = sample_timesteps(len(x0), gen, cfg.train.timestep_mean, cfg.train.timestep_std)
        noise = [torch.randn(x.shape, generator=self.rng.noise_generator, device=device, dtype=x.dtype) for x in x0]
        # With model.frame_conditioning each clip is drawn a mode of its stage's mix, from the group's generator
        # (every member draws alike), and given its frames beside a mask (clean in Kino's layout, as condition
        # latents in the I2V pipeline's); `counted`: the loss's tokens.
        mix = self.curriculum.stage(self.step).conditioning if cfg.model.frame_conditioning else {}
        given = draw_given(cfg.model, mix, x0, gen)
        raw_t = conditioned_timesteps(raw_t, given, cfg.train.timestep_mean, cfg.train.timestep_std,
                                      cfg.train.conditioned_timestep_mean, cfg.train.conditioned_timestep_std)
        t = shift_timesteps(raw_t, tokens, cfg.train.shift_reference_tokens)
        pairs = [noisy_pair(x, n, ti) for x, n, ti in zip(x0, noise, host_values(t))]
        inputs, counted, counts = conditioning_inputs(cfg.model, mix, x0, [p[0] for p in pairs], gen,
                                                      self.model.dit.grid, given=given,
                                                      conditions=self.frame_conditions(batch, given, x0))
        images = self.image_tokens(batch, given)
        if images is not None:
            text = dataclasses.replace(text, images=images)
        # Under sequence parallelism the prediction holds this rank's share of the tokens, and so does the target.
        prediction = self.engine(inputs, t.to(device, non_blocking=True), text)
        target = self.model.dit.patchify([p[1] for p in pairs])
        target = self.split.local(target) if self.split is not None else target
        squared = (prediction.float() - target.float()).pow(2).mean(dim=-1)  # per token
        total, local_counted = sum(tokens), None
        if counted is not None:  # a given frame's tokens count for nothing
            local_counted = (self.split.local(counted) if self.split is not None else counted).to(device)
            squared, total = squared * local_counted, sum(counts)
        loss = sequence_loss(squared, total, self.layout.degree)
        finite = all_ranks_finite(loss, device)
        # A non-finite loss is still backpropagated: DeepSpeed counts micro-batches to place the accumulation
        # boundary, and at that boundary its overflow check skips the optimizer step and clears every
        # micro-batch's gradient. Skipping backward and step() instead shifted the boundary, so a step's finite
        # micro-batches leaked their gradients into the next step.
        self.engine.backward(loss_weighted(loss, batch))
        # Everything below stays on the device: metrics read it at log steps only.
        per_sample = per_clip_loss(squared.detach(), tokens, self.split, counts=counts)
        # A rank's share of the micro-batch's tokens and FLOPs: summed over ranks, each counts once.
        flops = flops_per_batch(self.model, zip(tokens, text.lengths), self.flop_groups) / self.layout.degree
        return StepResult(finite=finite, tokens=squared.shape[0], loss_sum=squared.detach().sum(), flops=flops,
                          per_sample_loss=per_sample, timesteps=t,
                          loss_tokens=None if local_counted is None else local_counted.sum())

    def train_step(self) -> StepOutcome:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        set_learning_rate(self.engine, self.curriculum.lr(self.step))
        data_time, results, batches, finite_flags = 0.0, [], [], []
        start = time.perf_counter()
        self.data.begin_step(self.step, self.env.device)  # collective: the oldest epoch still to train anywhere
        data_time += time.perf_counter() - start
        for _ in range(self.cfg.zero.gradient_accumulation_steps):
            start = time.perf_counter()
            batch = self.data.next_batch(self.step)
            data_time += time.perf_counter() - start
            result = self.forward_backward_step(batch)
            finite_flags.append(result.finite)
            if batch.trains:  # else it ran with a zero loss weight and comes again (train/epoch_gate.py)
                results.append(result)
                batches.append(batch)
            self.engine.step()  # every micro-batch, finite or not (see forward_backward_step)
        # The one host read of the step, at its boundary (DeepSpeed's own gradient-norm and overflow checks
        # synchronise here too): whether every micro-batch was finite on every rank.
        finite = bool(torch.cat(finite_flags).all())
        outcome = StepOutcome(results, batches, data_time, trained=finite)
        if not finite and self.engine.was_step_applied():
            raise RuntimeError(f"step {self.step}: a micro-batch's loss was not finite, yet DeepSpeed applied the "
                               f"optimizer step (its overflow check did not see a non-finite gradient)")
        self.data.settle(self.step + 1, batches, trained=finite)
        if finite:
            self.nonfinite_in_row = 0
            self.ema.update()  # local: each rank's own pieces
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step, self.nonfinite_in_row)
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                raise NonFiniteLoss(f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}; "
                                    f"lower the learning rate or check the data (train.max_nonfinite_in_row)")
        return outcome

    # -- metrics ---------------------------------------------------------------------------------
    def _metrics(self, outcome: StepOutcome, step_time: float) -> Dict:
        """Collective: the step's sums are reduced over ranks, then train/tracking.py builds the row."""
        local = StepTotals.local(outcome)
        totals = StepTotals(*all_reduce_values([local.loss_sum, local.tokens, local.flops, local.data_time,
                                                local.loss_tokens], self.env.device))
        stage = self.curriculum.stage(self.step - 1)
        metrics = step_metrics(
            outcome, totals, step=self.step, stage=stage.name, token_budget=stage.token_budget,
            lr=self.curriculum.lr(self.step - 1), step_time=step_time, world_size=self.env.world_size,
            data_parallel=self.layout.data_world,
            accumulation=self.cfg.zero.gradient_accumulation_steps, peak_flops=self.peak_flops,
            grad_norm=global_grad_norm(self.engine), nonfinite_total=self.nonfinite_total,
            eta_s=self._recent_step_time * (self.curriculum.total_steps - self.step), dropped=self.data.dropped)
        if self.env.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2 ** 30
        return metrics

    # -- checkpoint and videos -------------------------------------------------------------------
    def checkpoint(self, last_step: bool = False, stopping: bool = False) -> Optional[Path]:
        """Collective. A checkpoint when the cadence asks for one (or, when stopping, unless this step has one)."""
        pieces = self.resumable_state()
        path = self.checkpoints.save_unless_saved(self.step, pieces) if stopping else \
            self.checkpoints.save_if_due(self.step, pieces, last_step)
        if path is not None:
            self.tracker.log_event(self.step, f"checkpoint saved: {path}")
        return path

    def ema_model(self) -> Optional[torch.nn.Module]:
        """Collective: the whole EMA assembled on the main rank, in a model that computes in the training precision,
        as the model trained (None on the other ranks). Built only when an evaluation or videos ask for it."""
        model = None
        if self.env.is_main:
            with torch.device("meta"):
                model = build_model(self.cfg)
            model = model.to_empty(device=self.env.device).to(compute_dtype(self.cfg))
        consolidate_into(model, self.engine.module, self.ema, self.env.device, release=self._training_released)
        return model

    def release_optimizer_state(self) -> None:
        """After the last checkpoint, before the end-of-run videos (which assemble the whole EMA on the main rank):
        the AdamW moments, 8 bytes a trained parameter (/ N under ZeRO), are freed, and the EMA's pieces go as the
        videos' model is assembled from them (4 bytes / N). Nothing trains after."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        inner.state.clear()
        self._training_released = True

    def evaluate(self) -> Dict[str, float]:
        """Collective. Prompt adherence and validation loss of the EMA weights (main rank; train/evaluate.py)."""
        model = self.ema_model()
        if not self.env.is_main:
            return {}
        if self._evaluator is None:
            self._evaluator = Evaluator(self.cfg, self.autoencoder, self.text, self.env.device)
        with local_cores_for_main_rank(self.env):
            metrics = self._evaluator(model)
        self.tracker.log_event(self.step, f"evaluation at step {self.step} (EMA weights):\n{evaluation_table(metrics)}")
        return metrics

    def generate_videos(self) -> List[Path]:
        """Collective. Videos of the fixed prompts (tracking.video_prompts), EMA weights, the current stage's shapes
        (main rank). No prompts, no videos: the EMA model is not assembled (every rank reads the same config)."""
        if not self.cfg.tracking.video_prompts:
            return []
        model = self.ema_model()
        if not self.env.is_main:
            return []
        cfg = self.cfg
        stage = self.curriculum.stage(max(self.step - 1, 0))
        prompts, shapes = generation_plan(cfg.tracking.video_prompts, stage_shapes(cfg, stage))
        with local_cores_for_main_rank(self.env):
            videos = generate(model, self.autoencoder, self.text, prompts, shapes, cfg.tracking.sampling_steps,
                              cfg.tracking.cfg_scale, cfg.train.seed, cfg.train.shift_reference_tokens,
                              self.env.device, cfg.tracking.sampler)
        paths = write_videos(videos, prompts, self.run_dir / "videos" / f"step_{self.step}", cfg.data.fps)
        self.tracker.log_videos(self.step, paths, prompts)
        return paths

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume()
        self.prepare_run_dir(resumed)
        from omegaconf import OmegaConf

        self.tracker.start(OmegaConf.to_container(OmegaConf.structured(cfg)), self.step if resumed else None)
        total, start_step = self.curriculum.total_steps, self.step
        if self.step >= total and self.env.is_main:
            log.info("the run already reached its last step (%d): nothing to train "
                     "(FRESH=1 / train.resume=false starts over)", total)
        stop_at = total if cfg.train.stop_after_steps is None else min(total, self.step + cfg.train.stop_after_steps)
        while self.step < stop_at:
            stage_index = self.curriculum.stage_index(self.step)
            if self.step == start_step or self.curriculum.boundaries[stage_index] == self.step:
                self.log_stage_start(stage_index)
            start = time.perf_counter()
            outcome = self.train_step()
            self.step += 1
            step_time = time.perf_counter() - start
            # Recent steps predict the rest better than the run's average (later stages are slower).
            self._recent_step_time = step_time if self._recent_step_time is None else \
                0.9 * self._recent_step_time + 0.1 * step_time
            # Decided alike on every rank: the metrics row below is a collective, evaluation is rank 0's alone.
            evaluation_due = self.evaluation_due(total)
            evaluation = self.evaluate() if evaluation_due else {}
            if evaluation:
                self.last_evaluation = evaluation
            if self.step % cfg.tracking.log_every == 0 or self.step == stop_at or evaluation_due:
                self.tracker.log({**self._metrics(outcome, step_time), **evaluation})
            if cfg.tracking.video_every and self.step % cfg.tracking.video_every == 0:
                self.generate_videos()
            self.checkpoint(last_step=self.step == total)
            if self.step < total and self.stop_request.agreed():
                break
        self.checkpoint(stopping=True)
        if self.step < total:
            why = f"asked to stop ({self.stop_request.reason})" if self.stop_request.reason else \
                "train.stop_after_steps"
            self.tracker.log_event(self.step, f"stopping at step {self.step} of {total} ({why}) with a checkpoint; "
                                              f"the next run resumes from it")
        self.data.close()
        if self.compiled and self.env.is_main:  # before sampling, which runs the blocks in eval mode
            self.compile_report = compile_report()
            log.info("compiled blocks (model.compile_backend=%s): %s", cfg.model.compile_backend,
                     describe_compile(self.compile_report))
        if self.step >= total:
            self.release_optimizer_state()
        videos = self.generate_videos() if self.step >= total else []
        summary = self.summary(videos)
        self.tracker.finish()
        return summary

    def prepare_run_dir(self, resumed: Optional[Path]) -> None:
        """Collective. Rank 0 writes config.yaml and, on a fresh start, moves an earlier run's outputs aside."""
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            if resumed:
                log.info("resuming from %s (step %d, stage %s)", resumed, self.step,
                         self.curriculum.stage(self.step).name)
            else:
                archived = archive_previous_run(self.run_dir)
                if archived:
                    log.info("starting fresh: earlier outputs of this run directory moved to %s", archived)
        if dist.is_initialized():
            dist.barrier()  # nobody writes into the run directory before it is set up

    def log_stage_start(self, stage_index: int) -> None:
        stage = self.curriculum.stages[stage_index]
        buckets = ", ".join(f"{b.frames}x{b.height}x{b.width}" for b in stage_shapes(self.cfg, stage))
        self.tracker.log_event(self.step, f"stage {stage.name!r} ({stage_index + 1}/{len(self.curriculum.stages)}) "
                                          f"from step {self.step}: buckets (frames x height x width) {buckets}; "
                                          f"token budget {stage.token_budget}; {self.data.describe_source(stage_index)}")

    def evaluation_due(self, total: int) -> bool:
        tracking = self.cfg.tracking
        return bool(tracking.eval_prompts or tracking.eval_clips) and (
            self.step == total or bool(tracking.eval_every) and self.step % tracking.eval_every == 0)

    def summary(self, videos: List[Path]) -> Dict[str, Any]:
        """Collective (the merged audit). What `python -m train` prints at the end."""
        preempted = self.stop_request.reason is not None
        return {"step": self.step, "total_steps": self.curriculum.total_steps,
                "preempted": preempted,  # only ever before the end
                "exit_status": self.stop_request.exit_status() if preempted else 0,
                "run_dir": str(self.run_dir), "videos": [str(p) for p in videos],
                "checkpoint": str(latest_checkpoint(self.run_dir / "checkpoints")),
                "audit": self.data.merged_audit().state_dict(), "data_plan": self.data.coordinator_report(),
                "wandb_dir": self.tracker.wandb_dir,
                "base_model": self.base_model, "compile": self.compile_report,
                "evaluation": self.last_evaluation}

