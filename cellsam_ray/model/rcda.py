"""Row-column decoupled attention (RCDA), the attention of Anchor-DETR and so of CellFinder.

Full attention of Q queries over an H×W map costs Q·H·W scores. RCDA instead gives each query one
softmax over the W columns (keys averaged over rows) and one over the H rows (keys averaged over
columns), and reads the value map with their outer product:
``out[q] = sum_{y,x} A_col[q, y] · A_row[q, x] · V[y, x]``.
Parameter layout (``in_proj_weight`` stacks q_row, q_col, k_row, k_col, v projections, 5·d rows)
matches the published ``MultiheadRCDA`` so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Queries are processed in chunks so the (chunk, W, head_dim) intermediate per head stays bounded
# (the encoder has 4096 queries per image); rows are independent, so chunking does not change results.
QUERY_CHUNK = 256


class MultiheadRCDA(nn.Module):
    """Multi-head RCDA with packed input projections and an output projection."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        """``embed_dim`` is split into ``num_heads`` heads of equal width."""
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(5 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: Tensor, slot: int) -> Tensor:
        d = self.embed_dim
        return F.linear(x, self.in_proj_weight[slot * d : (slot + 1) * d], self.in_proj_bias[slot * d : (slot + 1) * d])

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, d) -> (B, heads, N, d/heads)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, query_row: Tensor, query_col: Tensor, key_row: Tensor, key_col: Tensor, value: Tensor) -> Tensor:
        """Attend ``(B, Q, d)`` queries over a ``(B, H, W, d)`` map; returns ``(B, Q, d)``.

        ``query_row``/``key_row`` carry the column (x) position embedding, ``query_col``/``key_col`` the
        row (y) one. Key maps are averaged before projecting: the projection is affine, so this equals
        the published project-then-average and skips two full-map matmuls.
        """
        b, h, w, d = value.shape
        head_dim = d // self.num_heads
        k_row = self._heads(self._project(key_row.mean(dim=1), 2))  # (B, n, W, hd)
        k_col = self._heads(self._project(key_col.mean(dim=2), 3))  # (B, n, H, hd)
        v = self._project(value, 4).view(b, h, w, self.num_heads, head_dim).permute(0, 3, 1, 2, 4)
        v = v.reshape(b, self.num_heads, h, w * head_dim)  # (B, n, H, W·hd)
        scale = head_dim**-0.5
        outputs = []
        for start in range(0, query_row.shape[1], QUERY_CHUNK):
            stop = start + QUERY_CHUNK
            q_row = self._heads(self._project(query_row[:, start:stop], 0)) * scale
            q_col = self._heads(self._project(query_col[:, start:stop], 1)) * scale
            attn_row = torch.softmax(q_row @ k_row.transpose(-1, -2), dim=-1)  # (B, n, q, W)
            attn_col = torch.softmax(q_col @ k_col.transpose(-1, -2), dim=-1)  # (B, n, q, H)
            per_col = (attn_col @ v).unflatten(-1, (w, head_dim))  # (B, n, q, W, hd)
            out = (attn_row.unsqueeze(-2) @ per_col).squeeze(-2)  # (B, n, q, hd)
            outputs.append(out.transpose(1, 2).flatten(2))
        return self.out_proj(torch.cat(outputs, dim=1))
