"""Run by tests/test_retrieval.py under `deepspeed --num_gpus 2`: the contrastive loss over embeddings
gathered from both ranks, and its gradients after DeepSpeed's averaging, against one process on the whole
batch.

Each rank writes OUT/rankN.json with the loss of both and the largest gradient difference. BatchNorm runs on
its running statistics here (eval mode): in training it normalises with each rank's own batch, which is a
separate matter from the gathering being checked.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from models import (
    BackboneConfig,
    SideConfig,
    TextConfig,
    build_backbone,
    build_retrieval_network,
    build_text_encoder,
    contrastive_loss,
)
from trainer.config import load_config, resolve_deepspeed_config
from trainer.distributed import destroy, gather_batch, init_distributed
from trainer.optim import build_optimizer

GLOBAL_BATCH, FRAMES, WORDS, VOCAB = 8, 4, 6, 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    dist = init_distributed()
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="tiny"), projection=True)
    model = build_retrieval_network(SideConfig(width=32), backbone)
    model.output.copy_from(*backbone.output_head())
    text_encoder = build_text_encoder(TextConfig(name="tiny"), model.output.proj.out_features, VOCAB)
    for param in model.to_class.parameters():  # leave the zero init, so gradients reach the side blocks
        param.data.normal_(0, 0.02)
    reference = copy.deepcopy(model).eval()

    frames = torch.randn(GLOBAL_BATCH, FRAMES, 3, 32, 32)
    ids = torch.randint(0, VOCAB - 2, (GLOBAL_BATCH, WORDS))
    mask = torch.ones_like(ids)
    mask[::2, WORDS // 2 :] = 0  # every other caption is short
    text = text_encoder(ids, mask)

    # One process, whole batch.
    loss_ref = contrastive_loss(reference(frames, backbone(frames.flatten(0, 1)), text, mask))
    loss_ref.backward()

    # Each rank its half, embeddings gathered from both, DeepSpeed averaging the gradients.
    cfg = load_config(None, [f"data.batch_size={GLOBAL_BATCH // dist.world_size}"])
    ds = resolve_deepspeed_config(cfg, dist.world_size, False, 10**5)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(cfg.optim, model), config=ds
    )
    engine.eval()
    share = slice(
        dist.rank * GLOBAL_BATCH // dist.world_size, (dist.rank + 1) * GLOBAL_BATCH // dist.world_size
    )
    local = frames[share]
    logits = engine(local, backbone(local.flatten(0, 1)), text[share], mask[share], gather=gather_batch)
    loss = contrastive_loss(logits)
    engine.backward(loss)

    worst, compared = 0.0, 0
    named_ref = dict(reference.named_parameters())
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_full_grad(param)
        worst = max(worst, (grad.float() - named_ref[name].grad).abs().max().item())
        compared += 1
    scale = max(p.grad.abs().max().item() for p in reference.parameters() if p.grad is not None)
    result = {
        "loss": loss.item(),
        "loss_reference": loss_ref.item(),
        "logits_shape": list(logits.shape),
        "max_grad_difference": worst,
        "max_grad": scale,
        "params_compared": compared,
    }
    Path(args.out, f"rank{dist.rank}.json").write_text(json.dumps(result))
    destroy()


if __name__ == "__main__":
    main()
