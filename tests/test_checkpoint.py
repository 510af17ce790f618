"""
Tests for checkpoint.py: the base fingerprint (resume, eval and merge refuse another base by it).
Saving, loading, CRC checks and resume refusals run through the real train.py in test_train.py and
test_errors.py.
    python -m pytest -q tests/test_checkpoint.py
"""
import torch

import adapters as A
import checkpoint
from test_adapters import randomize_, tiny_model


def test_base_fingerprint():
    model = tiny_model()
    fp = checkpoint.base_fingerprint(model.state_dict())
    assert fp == checkpoint.base_fingerprint(tiny_model().state_dict()) and len(fp) == 64
    A.attach(model, "lora")
    randomize_(model)
    assert checkpoint.base_fingerprint(model.state_dict()) == fp  # adapters are no part of the base
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert checkpoint.base_fingerprint(model.state_dict()) != fp
    bf16 = tiny_model(dtype=torch.bfloat16)
    assert checkpoint.base_fingerprint(bf16.state_dict()) != fp  # the dtype is part of it
