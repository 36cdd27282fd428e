"""Two-layer MLP with tanh-approximated GELU; keys `mlp.0` / `mlp.2` as in the official code."""

from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int, bias: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels, bias=bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)
