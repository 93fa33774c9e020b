"""BOFT's butterfly structure: block sizes from the config and the permutations between butterfly factors."""

from __future__ import annotations

import math

import torch


def butterfly_blocks(dim: int, block_size: int, block_num: int, factors: int, module_name: str) -> tuple[int, int]:
    """(block_num, block_size) for a rotated dimension `dim`, with PEFT's checks on the butterfly factor count."""
    extra = factors - 1  # butterfly factors beyond the first (the paper's m - 1)
    where = f"{module_name}: rotated dimension {dim}"
    if block_size == 0:
        if dim % block_num:
            raise ValueError(f"{where} must be divisible by boft_block_num ({block_num})")
        if extra and (extra > int(math.log2(block_num)) or block_num % (2**extra)):
            raise ValueError(
                f"{where}: boft_block_num ({block_num}) must be a multiple of 2**{extra} for "
                f"boft_n_butterfly_factor={factors}"
            )
        block_size = dim // block_num
    else:
        if dim % block_size:
            raise ValueError(f"{where} must be divisible by boft_block_size ({block_size})")
        if extra and dim % (block_size * 2**extra):
            raise ValueError(
                f"{where} must be divisible by boft_block_size * 2**{extra} = {block_size * 2**extra} for "
                f"boft_n_butterfly_factor={factors}"
            )
        block_num = dim // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ValueError(
            f"{where}: with boft_n_butterfly_factor > 1, boft_block_num ({block_num}) and boft_block_size "
            f"({block_size}) must be even"
        )
    return block_num, block_size


def butterfly_permutation(dim: int, groups: int, chunk: int) -> torch.Tensor:
    """Indices `perm` of PEFT's butterfly permutation matrix P (P[i, perm[i]] = 1): within each of `groups` equal
    groups, the `chunk`-sized pieces are taken in even-then-odd order."""
    size = dim // groups
    pieces = size // chunk
    order = list(range(0, pieces, 2)) + list(range(1, pieces, 2))
    within = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in order])
    return torch.cat([g * size + within for g in range(groups)])


def factor_permutations(
    dim: int, block_num: int, block_size: int, factors: int
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """(perm, inverse perm) of each butterfly factor k (the factor is P_k blockdiag(R_k) P_k^T), or None where P_k
    is the identity (always the first factor, and every factor when there is only one)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
    for k in range(1, factors):
        perm = butterfly_permutation(dim, block_num // 2**k, block_size // 2)
        out.append((perm, torch.argsort(perm)))
    return out
