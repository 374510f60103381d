"""Random projections of per-sample gradients, one sub-projector per parameter.

A projector maps a concatenation of parameter blocks x = [x_1, ..., x_m] to S x = Σ_j S_j x_j. Each block's
S_j is rebuilt from (seed, parameter name) alone, so features can be accumulated module by module inside the
backward pass and the result does not depend on how parameters are grouped. Row blocks of a Rademacher or
CountSketch matrix are independent, so this is the same distribution as one big matrix.

- `sjlt`: sparse JL (CountSketch, s nonzeros per column, each ±1/sqrt(s)); P scatter-adds, deterministic on CPU.
- `rademacher`: dense ±1/sqrt(k) (LESS/TRAK's distribution, scaled so E‖Sx‖² = ‖x‖²); cached per block.
- `none`: the identity; the output is the concatenated gradient in parameter order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from dataflex.core.errors import ConfigError

PROJECTORS = ("sjlt", "rademacher", "none")
DENSE_LIMIT_BYTES = 4 << 30  # the largest dense projection matrix held in memory (fp32)


def block_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (global seed, parameter name), independent of any other block."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Projector:
    """Projects named parameter blocks [B, numel] into one [B, out_dim] fp32 feature, additively."""

    def __init__(
        self, kind: str, blocks: Sequence[tuple[str, int]], proj_dim: int = 8192, seed: int = 0, sparsity: int = 1
    ) -> None:
        if kind not in PROJECTORS:
            raise ConfigError(f"projector '{kind}' is not known; use one of {', '.join(PROJECTORS)}")
        if kind != "none" and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1):
            raise ConfigError(f"proj_dim must be an integer >= 1, got {proj_dim!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, int) or sparsity < 1:
            raise ConfigError(f"sjlt sparsity must be an integer >= 1, got {sparsity!r}")
        self.kind = kind
        self.seed = int(seed)
        self.sparsity = sparsity
        self.sizes = dict(blocks)
        if len(self.sizes) != len(blocks):
            raise ValueError("projector blocks must have unique names")
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, numel in blocks:
            self.offsets[name] = offset
            offset += numel
        self.total = offset
        self.out_dim = offset if kind == "none" else proj_dim
        dense_bytes = 4 * self.total * self.out_dim
        if kind == "rademacher" and dense_bytes > DENSE_LIMIT_BYTES:
            # The dense matrix is cached per block: at LoRA sizes a few GB, for full fine-tuning far beyond memory.
            raise ConfigError(
                f"projector 'rademacher' needs a dense {self.total:,} x {self.out_dim} matrix "
                f"({dense_bytes / 2**30:.1f} GiB) for these {self.total:,} trainable parameters; use projector: sjlt "
                "(same guarantee, no matrix) or a smaller proj_dim"
            )
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}

    def describe(self) -> dict[str, object]:
        """Everything that determines the map (part of the datastore key)."""
        return {
            "kind": self.kind,
            "proj_dim": self.out_dim,
            "seed": self.seed,
            "sparsity": self.sparsity,
            "blocks": [[n, s] for n, s in self.sizes.items()],
        }

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(block_seed(self.seed, name))

    def _sjlt(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, str(device))
        if key not in self._cache:
            n, s, gen = self.sizes[name], self.sparsity, self._generator(name)
            idx = torch.randint(0, self.out_dim, (s, n), generator=gen)
            sign = (torch.randint(0, 2, (s, n), generator=gen) * 2 - 1).float() / s**0.5
            self._cache[key] = (idx.to(device), sign.to(device))
        return self._cache[key]  # type: ignore[return-value]

    def _dense(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            gen = self._generator(name)
            bits = torch.randint(0, 2, (self.sizes[name], self.out_dim), generator=gen)
            self._cache[key] = ((bits * 2 - 1).float() / self.out_dim**0.5).to(device)
        return self._cache[key]  # type: ignore[return-value]

    def project_into(self, out: torch.Tensor, name: str, block: torch.Tensor, scratch: bool = False) -> None:
        """out[B, out_dim] += S_name · block[B, numel], in fp32. `scratch=True`: the caller hands over `block`
        and it may be overwritten (saves one [B, numel] allocation per block inside the backward pass)."""
        block = block.reshape(block.shape[0], -1).float()
        if block.shape[1] != self.sizes[name]:
            raise ValueError(f"block '{name}' has {block.shape[1]} values, the projector expects {self.sizes[name]}")
        if self.kind == "none":
            start = self.offsets[name]
            out[:, start : start + block.shape[1]] += block
        elif self.kind == "sjlt":
            idx, sign = self._sjlt(name, block.device)
            if self.sparsity == 1 and scratch:
                out.index_add_(1, idx[0], block.mul_(sign[0]))
                return
            for j in range(self.sparsity):
                out.index_add_(1, idx[j], block * sign[j])
        else:
            out.addmm_(block, self._dense(name, block.device))

    def project_all_into(self, out: torch.Tensor, block: torch.Tensor, scratch: bool = False) -> None:
        """out[B, out_dim] += S · block for `block` = every parameter block concatenated in projector order
        ([B, total]): the sum of `project_into` over the blocks in a few large ops instead of a few per block."""
        block = block.float()
        if block.shape[1] != self.total:
            raise ValueError(f"concatenated block has {block.shape[1]} values, the projector expects {self.total}")
        if self.kind == "none":
            out += block
        elif self.kind == "sjlt":
            key = ("*", str(block.device))
            if key not in self._cache:
                parts = [self._sjlt(n, block.device) for n in self.sizes]
                self._cache[key] = (torch.cat([i for i, _ in parts], dim=1), torch.cat([g for _, g in parts], dim=1))
            idx, sign = self._cache[key]  # type: ignore[misc]
            for j in range(self.sparsity):
                out.index_add_(1, idx[j], block.mul_(sign[j]) if self.sparsity == 1 and scratch else block * sign[j])
        else:
            key = ("*", str(block.device))
            if key not in self._cache:
                self._cache[key] = torch.cat([self._dense(n, block.device) for n in self.sizes], dim=0)
            out.addmm_(block, self._cache[key])  # type: ignore[arg-type]

    def matrix(self, name: str) -> torch.Tensor:
        """The explicit [numel, out_dim] matrix of one block (for tests and small checks)."""
        eye = torch.eye(self.sizes[name])
        out = torch.zeros(self.sizes[name], self.out_dim)
        self.project_into(out, name, eye)
        return out
