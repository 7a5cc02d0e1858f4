"""BEVT pretraining in the trainer's loop: masked image modelling and masked video modelling, one encoder.

Each optimizer step takes, per micro-step, one image batch (image shards) and, in the joint stage, one video
batch (video shards); a frozen tokenizer (placed like the frozen backbone: whole, or ZeRO-3-partitioned)
turns every image and frame into target codes; masks are drawn from (seed, rank, micro-step, stream), so a
resumed run masks exactly as the uninterrupted one would; loss = L_video + lambda * L_image.

Stage 1 (``bevt.stage: image``) trains the image stream alone; stage 2 (``joint``) starts from it with
``swin.init_from`` + ``swin.inflate`` (the video patch embedding and the temporal bias offsets inflated from
the image ones). Fine-tuning is ordinary recognition with ``model: video_swin``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data.images import build_image_loader
from data.masking import build_masking, masks_for
from data.shards import Unlabelled, build_loader
from data.video import normalize
from models.bevt import BEVT, STREAMS
from models.swin3d import build_swin, check_fit
from models.tokenizers import build_tokenizer
from trainer.config import ConfigError
from trainer.distributed import all_reduce_sum
from trainer.evaluate import lockstep, with_videos
from trainer.frozen import place_frozen, resolve_frozen_config
from trainer.preemption import ignore_stop_signals
from trainer.trainer import Trainer

STREAM_IDS = {name: i for i, name in enumerate(STREAMS)}  # part of each mask's random key


class BEVTTrainer(Trainer):
    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        state = self.resumed_state
        self.image_state: dict[int, dict] = {int(k): v for k, v in state.get("image_data", {}).items()}
        self.image_batches_seen: int = state.get("image_batches_seen", 0)
        # per stream since the last log line: loss sum, masked cells predicted right, masked cells
        self.window = {name: torch.zeros(3, device=dist.device) for name in self.streams}

    # -- model -----------------------------------------------------------------------------------------------

    def build_network(self) -> BEVT:
        cfg = self.cfg
        self.streams = cfg.bevt.streams
        self.image_size = cfg.swin.image_size
        encoder = build_swin(cfg.swin, cfg.bevt.norms, final_norm=False)  # the decoders' shared norm instead
        self.tokenizer_module, self.tokenize = self._build_tokenizer()
        grid = self.image_size // encoder.stride
        if self.tokenizer_module.grid != grid:
            raise ConfigError(
                f"bevt.tokenizer: its {self.tokenizer_module.grid}x{self.tokenizer_module.grid} code grid "
                f"does not match the encoder's {grid}x{grid} stage-3 grid (swin.image_size "
                f"{self.image_size} / {encoder.stride}); fit the tokenizer at a matching size"
            )
        frames, patch_t = cfg.data.num_frames, encoder.shape.patch[0]
        try:
            check_fit(encoder.shape, self.image_size, frames if "video" in self.streams else None)
            slots = {"image": None, "video": frames // patch_t}
            self.masking = {
                name: build_masking(cfg.bevt.mask, (grid, grid), slots[name]) for name in self.streams
            }
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        model = BEVT(encoder, self.tokenizer_module.vocab_size, cfg.bevt.decoder_dim)
        self.load_init(model)
        return model

    def _build_tokenizer(self):
        cfg = self.cfg

        def build(construct, gather, writer):
            return build_tokenizer(cfg.bevt.tokenizer, construct, gather, writer)

        try:
            ds = None
            if cfg.train.frozen_deepspeed_config:

                def largest() -> int:
                    with torch.device("meta"):
                        model = build_tokenizer(cfg.bevt.tokenizer, load=False)
                    return max(p.numel() for p in model.parameters())

                ds = resolve_frozen_config(cfg, self.dist.bf16_supported, "float32", largest)
            return place_frozen(build, self.dist, ds)
        except (ValueError, KeyError) as exc:
            raise ConfigError(str(exc).strip("'\"")) from None

    def describe(self) -> str:
        tok = self.tokenizer_module
        placed = " (ZeRO-3 partitioned)" if any(hasattr(p, "ds_id") for p in tok.parameters()) else ""
        return (
            f"BEVT ({self.cfg.bevt.stage}: {', '.join(self.streams)}) on Video Swin {self.cfg.swin.name}; "
            f"{self.cfg.bevt.tokenizer.kind} tokenizer{placed}, {tok.vocab_size} codes on "
            f"{tok.grid}x{tok.grid} cells"
        )

    # -- one step --------------------------------------------------------------------------------------------

    def stream_inputs(self, name: str, frames: torch.Tensor, key: tuple[int, ...]) -> tuple:
        """uint8 images (B, 3, S, S) or clips (B, T, 3, S, S) -> (normalised input, mask, target codes)."""
        device = self.dist.device
        frames = frames.to(device, non_blocking=True)
        batch = frames.shape[0]
        mask = masks_for(self.masking[name], batch, self.cfg.train.seed, *key, STREAM_IDS[name]).to(device)
        if name == "image":
            return normalize(frames, self.dtype), mask, self.tokenize(frames)
        codes = self.tokenize(frames.flatten(0, 1)).view(*frames.shape[:2], *mask.shape[-2:])  # (B, T, g, g)
        return normalize(frames, self.dtype).transpose(1, 2), mask, codes  # (B, 3, T, S, S)

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        total = torch.zeros((), device=self.dist.device)
        weights = {"image": self.cfg.bevt.image_weight, "video": 1.0}
        for _ in range(self.cfg.train.grad_accum):
            batch = next(batches)
            inputs = {}
            if "video" in batch:
                video = batch["video"]
                self.data_state[video["slot"]] = video["state"]
                frames = video["frames"]
                if self.augment is not None:
                    frames = self.augment(frames.to(self.dist.device))
                inputs["video"] = self.stream_inputs("video", frames, (self.dist.rank, self.batches_seen))
                self.batches_seen += 1
            image = batch["image"]
            self.image_state[image["slot"]] = image["state"]
            key = (self.dist.rank, self.image_batches_seen)
            inputs["image"] = self.stream_inputs("image", image["frames"], key)
            self.image_batches_seen += 1
            loss, results = self.engine(inputs, weights)
            self.backward_step(loss)
            total += loss.detach()
            for name, result in results.items():  # summed on the device: no sync per step
                self.window[name] += torch.stack(
                    [result[k].detach().float() for k in ("loss", "correct", "masked")]
                )
        return total / self.cfg.train.grad_accum

    def throughput(self, steps: int, seconds: float) -> dict:
        micro = self.cfg.train.grad_accum * self.dist.world_size * steps / max(seconds, 1e-9)
        rates = {"images_per_s": self.cfg.data.image_batch_size * micro}
        if "video" in self.streams:
            rates["clips_per_s"] = self.cfg.data.batch_size * micro
        return rates

    def window_metrics(self, steps: int) -> dict:
        """Per stream: masked-token accuracy and loss over the micro-steps since the last log (all ranks)."""
        values = {}
        micro = steps * self.cfg.train.grad_accum * self.dist.world_size
        for name in self.streams:
            loss, correct, masked = all_reduce_sum(self.window[name].tolist(), self.dist.device)
            values[f"{name}/loss"] = loss / micro
            values[f"{name}/masked_acc"] = correct / max(masked, 1)
            self.window[name].zero_()
        return values

    def train_state(self) -> dict:
        return {
            **super().train_state(),
            "image_data": self.image_state,
            "image_batches_seen": self.image_batches_seen,
        }

    # -- data ------------------------------------------------------------------------------------------------

    def _loader(self, train: bool):
        """Training: an endless iterator of {"image": batch, "video": batch} (video in the joint stage)."""
        loaders = {name: self._stream_loader(name, train) for name in self.streams}
        if not train:
            return loaders
        return self._joint(loaders)

    def _joint(self, loaders: dict) -> Iterator[dict]:
        iterators = {name: iter(loader) for name, loader in loaders.items()}
        while True:
            yield {name: next(iterator) for name, iterator in iterators.items()}

    def _stream_loader(self, name: str, train: bool):
        cfg, dist = self.cfg, self.dist
        workers = max(1, cfg.data.num_workers)
        video = name == "video"
        state = self.data_state if video else self.image_state
        seen = self.batches_seen if video else self.image_batches_seen
        common = (train, cfg.train.seed, dist.rank, dist.world_size)
        position = {
            "resume": state if train else None,
            "worker_offset": seen % workers if train else 0,
            "worker_init_fn": ignore_stop_signals,
        }
        if video:
            return build_loader(cfg.data, self.image_size, Unlabelled(), *common, **position)
        shards = cfg.data.image_shards if train else cfg.data.image_eval_shards
        batch = cfg.data.image_batch_size if train else cfg.data.eval_batch_size
        return build_image_loader(cfg.data, shards, batch, self.image_size, *common, **position)

    def loader_states(self) -> list[dict[int, dict]]:
        return [self.data_state, self.image_state]

    # -- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, order: str = "original") -> dict:
        """Masked-token accuracy per stream on the evaluation shards, masks fixed by ``eval.seed``, beside
        two baselines: chance (1 / codes) and always predicting the most frequent masked code."""
        self.engine.eval()
        try:
            result = {"chance": 1.0 / self.tokenizer_module.vocab_size}
            for name, loader in self._loader(train=False).items():
                if name == "image" and not self.cfg.data.image_eval_shards:
                    continue
                result.update(self._evaluate_stream(name, loader))
            return result
        finally:
            self.engine.train()

    def _evaluate_stream(self, name: str, loader) -> dict:
        vocab, size = self.tokenizer_module.vocab_size, self.image_size
        shape = (1, 3, size, size) if name == "image" else (1, 1, self.cfg.data.num_frames, 3, size, size)
        filler = {"frames": torch.zeros(shape, dtype=torch.uint8), "keys": []}
        counts = torch.zeros(
            vocab + 3, dtype=torch.float64
        )  # masked-code histogram, loss sum, correct, cells
        slot_skips: dict[int, dict] = {}
        for index, (batch, real) in enumerate(
            lockstep(with_videos(loader, slot_skips), filler, self.dist.device)
        ):
            frames = batch["frames"] if name == "image" else batch["frames"][:, 0]  # one view per video
            key = (self.cfg.eval.seed, self.dist.rank, index)
            inputs = self.stream_inputs(name, frames, key)
            _, results = self.engine({name: inputs}, {name: 1.0})
            if not real:
                continue
            _, mask, codes = inputs
            if name == "video":
                mask = mask.repeat_interleave(codes.shape[1] // mask.shape[1], 1)
            result = results[name]
            counts[:vocab] += torch.bincount(codes[mask].cpu(), minlength=vocab).double()
            counts[vocab:] += torch.tensor(
                [
                    result["loss"].item() * result["masked"].item(),
                    result["correct"].item(),
                    result["masked"].item(),
                ],
                dtype=torch.float64,
            )
        skipped = sum(n for skips in slot_skips.values() for n in skips.values())
        totals = torch.tensor(all_reduce_sum([*counts.tolist(), skipped], self.dist.device))
        cells = max(totals[vocab + 2].item(), 1.0)
        return {
            f"{name}_masked_acc": totals[vocab + 1].item() / cells,
            f"{name}_majority_acc": totals[:vocab].max().item() / cells,
            f"{name}_loss": totals[vocab].item() / cells,
            f"{name}_codes_used": int((totals[:vocab] > 0).sum().item()),
            f"{name}_masked_cells": int(totals[vocab + 2].item()),
            f"{name}_skipped": int(totals[vocab + 3].item()),
        }

    def final_evaluation(self) -> dict:
        result = {"step": self.step, "stage": self.cfg.bevt.stage, **self.evaluate()}
        for name in self.streams:
            if f"{name}_masked_acc" in result:
                result[f"{name}_acc_over_chance"] = result[f"{name}_masked_acc"] / result["chance"]
        return self.write_final(result)
