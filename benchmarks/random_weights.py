"""Give a Hugging Face model folder (config.json + tokenizer, no weights) random bfloat16 weights in its shape.

Speed depends on shapes, not values: a GPU machine that cannot download the real weights times the same model
this way.  ``python benchmarks/random_weights.py FOLDER [FOLDER ...]`` (folders that hold weights are left as they are).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

for folder in map(Path, sys.argv[1:]):
    if any(folder.glob("*.safetensors")):
        continue
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    print(f"{folder}: random weights written")
