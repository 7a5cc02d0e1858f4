"""Training: one DeepSpeed engine over the side network, fed by a frozen backbone.

DeepSpeed picks its accelerator when first imported, so this package chooses it before any submodule
imports deepspeed: the CPU accelerator (gloo) when no CUDA device exists, unless DS_ACCELERATOR is set.
"""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
