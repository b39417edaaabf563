"""BridgeBlock: the Bridge layer of arXiv 2510.01143, a pre-norm attention along the batch axis.

Placed after the feed-forward block of a decoder layer, it is used as a residual:

    h = h + MLP(norm2(h))
    h = h + BridgeBlock(h, cu_group_lens, key_mask)

At every position, the rows of one group (the parallel generations of one prompt) attend to each other; see
`bridge_ops.bridge_attention` for the masking rules. The output projection starts at zero, so a freshly
inserted block returns exactly zero and the bridged model equals the base model.
"""

from typing import Optional

import torch
from torch import nn

from .ops import bridge_attention, bridge_block_decode

DEFAULT_HEAD_DIM = 128


def default_init_std(hidden_size: int) -> float:
    """hidden_size ** -0.5: the std of the Q/K/V (and P-Match input) projections that keeps projections of a
    normalized input at unit variance."""
    return hidden_size**-0.5


class BridgeBlock(nn.Module):
    """Pre-norm residual Bridge attention; `forward` returns the residual delta.

    Args:
        hidden_size: model width D.
        d_bridge: inner width of the Q/K/V projections (default 512, the paper's share of 2.8-5.1% of the
            parameters on 1.5B-8B models).
        num_heads: attention heads; default max(1, d_bridge // 128). Must divide d_bridge.
        norm: the input normalization module (e.g. an instance of the base model's RMSNorm class); default
            `torch.nn.RMSNorm(hidden_size, eps)`.
        llama_rms_norm: `norm` computes HF's Llama RMSNorm (`weight * x / sqrt(mean(x^2) + norm.variance_epsilon)`,
            in float32), so the fused decode op can compute it (bridge_ops.hf says so for the model types it
            supports); a torch.nn.RMSNorm is fused without it.
        eps: epsilon of the default RMSNorm.
        init_std: standard deviation of the normal initialization of the Q/K/V projections; default
            `hidden_size ** -0.5`, which gives unit-variance queries and keys from the normalized input, so attention
            logits differ across peers by O(1) at any width (a fixed 0.02 makes them differ by ~0.006 at hidden 128:
            the block starts, and stays, a uniform mean-pool of its group).
        device, dtype: where and in which dtype to create the parameters.

    Parameters (no biases): norm weight [D], q_proj / k_proj / v_proj [d_bridge, D], o_proj [D, d_bridge]
    (zero-initialized).
    """

    def __init__(
        self,
        hidden_size: int,
        d_bridge: int = 512,
        num_heads: Optional[int] = None,
        *,
        norm: Optional[nn.Module] = None,
        llama_rms_norm: bool = False,
        eps: float = 1e-6,
        init_std: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if hidden_size < 1 or d_bridge < 1:
            raise ValueError(f"bridge_ops: hidden_size and d_bridge must be >= 1, got {hidden_size}, {d_bridge}")
        num_heads = max(1, d_bridge // DEFAULT_HEAD_DIM) if num_heads is None else num_heads
        if num_heads < 1 or d_bridge % num_heads != 0:
            raise ValueError(f"bridge_ops: num_heads ({num_heads}) must be >= 1 and divide d_bridge ({d_bridge})")
        self.hidden_size, self.d_bridge, self.num_heads = hidden_size, d_bridge, num_heads
        self.head_dim = d_bridge // num_heads
        self.init_std = default_init_std(hidden_size) if init_std is None else init_std
        factory = {"device": device, "dtype": dtype}
        self.norm = norm if norm is not None else nn.RMSNorm(hidden_size, eps=eps, **factory)
        # the class that computes it: a wrapper that changes the norm's class (e.g. FSDP's) turns the fusion off
        self._llama_norm_class = type(self.norm).__name__ if llama_rms_norm else None
        self.q_proj = nn.Linear(hidden_size, d_bridge, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, d_bridge, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, d_bridge, bias=False, **factory)
        self.o_proj = nn.Linear(d_bridge, hidden_size, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Q/K/V ~ N(0, init_std^2); O = 0 (the block returns exactly zero); the norm's own reset."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=self.init_std)
        nn.init.zeros_(self.o_proj.weight)
        if hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()

    @staticmethod
    def parameter_count(hidden_size: int, d_bridge: int = 512, norm_parameters: Optional[int] = None) -> int:
        """Parameters of one block: 4 * hidden_size * d_bridge projections + the norm (default: a D-vector)."""
        return 4 * hidden_size * d_bridge + (hidden_size if norm_parameters is None else norm_parameters)

    def num_parameters(self) -> int:
        """Parameters of this block (what it adds to each decoder layer)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, hidden: torch.Tensor, cu_group_lens: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """hidden [B, S, D], cu_group_lens int32 [G+1], key_mask bool [B, S] or None -> delta [B, S, D]."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"bridge_ops: hidden must have shape [B, S, {self.hidden_size}], got {list(hidden.shape)}")
        batch, seqlen, _ = hidden.shape
        x = self.norm(hidden)
        heads = (batch, seqlen, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        mixed = bridge_attention(q, k, v, cu_group_lens, key_mask)
        return self.o_proj(mixed.view(batch, seqlen, self.d_bridge))

    def residual(
        self, hidden: torch.Tensor, cu_group_lens: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """`hidden + self(hidden, ...)`. When no gradient is needed and the norm is an RMSNorm the fused op computes
        (torch.nn.RMSNorm, or a Llama RMSNorm: `llama_rms_norm`), it runs as one `bridge_block_decode` call."""
        eps = self.fused_norm_eps(hidden.dtype)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, *self.parameters()))
        if eps is None or needs_grad:
            return hidden + self(hidden, cu_group_lens, key_mask)
        projections = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight)
        return bridge_block_decode(hidden, self.norm.weight, eps, *projections, cu_group_lens, key_mask, self.num_heads)

    def fused_norm_eps(self, dtype: torch.dtype) -> Optional[float]:
        """The epsilon of the norm if `bridge_block_decode` can compute it, else None."""
        if isinstance(self.norm, nn.RMSNorm) and self.norm.weight is not None:
            return torch.finfo(dtype).eps if self.norm.eps is None else self.norm.eps
        if type(self.norm).__name__ == self._llama_norm_class:
            return self.norm.variance_epsilon
        return None

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, d_bridge={self.d_bridge}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, parameters={self.num_parameters()}"
        )
