"""Orthogonal block rotations shared by the orthogonal methods: the Cayley transform of skew-symmetric blocks
and block-diagonal rotations applied to activations or folded into weights without forming the full matrix."""

from __future__ import annotations

import torch


def skew_from_upper(vec: torch.Tensor, block: int) -> torch.Tensor:
    """(n, b, b) skew-symmetric matrices from (n, b(b-1)/2) strictly-upper-triangular entries in row-major order
    (`torch.triu_indices(b, b, 1)`, the order PEFT saves them in)."""
    rows, cols = torch.triu_indices(block, block, 1, device=vec.device)
    flat = vec.new_zeros(vec.shape[0], block * block).index_copy(1, rows * block + cols, vec)
    upper = flat.view(vec.shape[0], block, block)
    return upper - upper.transpose(-2, -1)


def project_near_identity(vec: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """Constrained OFT (COFT): each row's b x b skew-symmetric block S scaled onto the Frobenius sphere of radius
    eps / sqrt(rows) when it lies outside it (R = Cayley(S) stays that close to the identity); rows inside are kept.

    The norm, radius and scaling are PEFT's operations in PEFT's order, so a scaled row has PEFT's values. Where
    float rounding leaves a scaled row a hair outside the sphere (PEFT would scale it again at its next use, moving
    it by an ulp every time), it is moved inside by an ulp or two: projecting again then changes nothing.
    """
    rows = vec.shape[0]
    radius = eps / torch.sqrt(torch.tensor(float(rows), device=vec.device, dtype=torch.float32)).to(vec.dtype)
    norm = torch.norm(skew_from_upper(vec, block), dim=(1, 2))
    inside = norm <= radius
    if bool(inside.all()):
        return vec  # the common case once projected: nothing to do
    out = torch.where(inside[:, None], vec, radius * (vec / norm[:, None]))
    for _ in range(8):
        over = torch.norm(skew_from_upper(out, block), dim=(1, 2)) > radius
        if not over.any():
            break
        out = torch.where(over[:, None], torch.nextafter(out, torch.zeros_like(out)), out)
    return out


def cayley(skew: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Orthogonal (n, b, b) matrices from skew-symmetric ones.

    Exact:  R = (I - S)(I + S)^-1.  Neumann (PEFT >= 0.18's series, cheaper, approximately orthogonal):
    R = I + 2S + 2S^2 + ... + 2S^(t-2) + S^(t-1) for t terms (t=2: I + 2S; t=1: I).
    """
    n, b, _ = skew.shape
    eye = torch.eye(b, device=skew.device, dtype=skew.dtype).expand(n, b, b)
    if not neumann:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    rot = eye.clone()
    if terms > 1:
        rot = rot + 2.0 * skew
    if terms > 2:
        power = skew @ skew
        rot = rot + 2.0 * power
        for _ in range(3, terms - 1):
            power = power @ skew
            rot = rot + 2.0 * power
        rot = rot + power @ skew  # the last term has coefficient 1
    return rot


def rotate_last(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(blocks) along the last dim; `blocks` is (r, b, b), or (1, b, b) shared by every block."""
    r, b = x.shape[-1] // blocks.shape[-1], blocks.shape[-1]
    xs = x.reshape(*x.shape[:-1], r, b)
    if blocks.shape[0] == 1:
        return (xs @ blocks[0]).reshape(x.shape)
    return torch.einsum("...rk,rkc->...rc", xs, blocks).reshape(x.shape)


def rotate_columns(weight: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """W @ blockdiag(blocks)^T (``transpose=True``) or W @ blockdiag(blocks), with W flattened to (rows, cols)."""
    flat = weight.reshape(weight.shape[0], -1)
    r, b = flat.shape[1] // blocks.shape[-1], blocks.shape[-1]
    blocks = blocks.expand(r, b, b)
    spec = "oik,ick->oic" if transpose else "oik,ikc->oic"
    return torch.einsum(spec, flat.reshape(flat.shape[0], r, b), blocks).reshape(weight.shape)
