"""Language models. Torch only: nothing here knows about MPI, ranks or gradient buffers.

``build(name, vocab_size, **sizes)`` returns a module whose ``forward(idx, targets=None)``
returns ``(logits, loss)``; ``loss`` is the mean cross-entropy over all target tokens, or None.
"""

from __future__ import annotations

import torch.nn as nn


def build(name: str, *, vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
          dropout: float) -> nn.Module:
    if name == "gpt":
        from mpilm.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                             block_size=block_size, dropout=dropout))
    if name == "lstm":
        from mpilm.models.lstm import LSTMConfig, LSTMLM

        return LSTMLM(LSTMConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, dropout=dropout))
    raise ValueError(f"unknown model {name!r}")
