"""The classic LSTM language model: Embedding -> multi-layer LSTM -> Linear.

Each training window is an independent sequence: the hidden state starts at zero for every batch
(windows are sampled at random offsets, so carrying state across batches would join unrelated
text). ``generate`` carries the state across generated tokens, as it should. The output layer is
tied to the embedding when their widths agree (Press & Wolf, 2017).

Not here: truncated BPTT over consecutive batches, any knowledge of distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mpilm.models.sampling import sample_next


@dataclass
class LSTMConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_embd: int = 256
    dropout: float = 0.0


class LSTMLM(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_embd, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, 0.0, 0.05)

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        # 6 x params is the matmul cost of forward + backward, as for the transformer
        return 6 * self.num_params()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state=None):
        out, state = self.lstm(self.drop(self.embed(idx)), state)  # state None -> zeros per batch
        logits = self.head(self.drop(out))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 0.8, top_k: int | None = 40,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        logits, state = self._step(idx, None)
        for _ in range(new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            idx = torch.cat((idx, nxt), dim=1)
            logits, state = self._step(nxt, state)
        return idx

    def _step(self, idx, state):
        out, state = self.lstm(self.embed(idx), state)
        return self.head(out[:, -1, :]), state
