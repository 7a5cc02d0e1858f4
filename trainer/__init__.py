"""Training: one DeepSpeed engine over the side network, fed by a frozen backbone.

DeepSpeed picks its accelerator when first imported, so this package chooses it before any submodule
imports deepspeed: the CPU accelerator (gloo) when no CUDA device exists, unless DS_ACCELERATOR is set.
Inside a virtual environment, DeepSpeed's JIT-compiled ops go to the environment's own folder (where
`make install` built them) unless TORCH_EXTENSIONS_DIR is set.
"""

import os
import sys

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
