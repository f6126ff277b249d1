"""llama.cpp's scale searches (``ggml-quants.c``), vectorised over blocks.

Every function takes x [B, n] (B blocks of n weights, float32) and searches each block's scale the
way the C function of the same name does for one block. Loops run over the search's trials or over
the n positions of a block (coordinate descent), never over blocks. Where the C code picks the best
of independent trials sequentially with a strict comparison, we take the first arg-best, which is the
same choice up to float rounding of the comparison; trials that depend on the previous acceptance
(``make_qkx2_quants``/``make_qkx3_quants`` move the minimum) run sequentially here too.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


def sum_first(t: torch.Tensor) -> torch.Tensor:
    """Give the sum over dim 0 added in order, in float32, as the C loops add (t[0] + t[1] + ...).

    torch's vectorised sums add in another order; the searches compare near-equal candidates
    (least-squares fits with cancellation), so the order decides some choices. numpy's ``add.reduce``
    over the outer axis of a C-contiguous array adds whole rows one after the other (its pairwise
    summation applies only along a contiguous reduced axis), so one call replaces the Python loop;
    a single column is contiguous, so it keeps the loop.
    """
    t = t.contiguous()
    if t.dim() > 1 and t[0].numel() > 1:
        return torch.from_numpy(np.add.reduce(t.numpy(), axis=0))
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Give the sum over the last dim added left to right in float32 (``sum_first`` of the moved dim)."""
    return sum_first(t.movedim(-1, 0))


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """Give c / t correctly rounded (torch computes ``scalar / tensor`` as c · (1/t), off by an ulp at times)."""
    return torch.div(torch.tensor(c, dtype=t.dtype), t)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """Give the correctly rounded float32 square root (C ``sqrtf``; torch's vectorised float32 sqrt is not)."""
    return torch.sqrt(x.double()).float()


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Give each row's value of largest magnitude, sign kept (the first one on ties, as the C loops)."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)


def _take(chosen: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Give each tensor [B, T, ...] at trial ``chosen`` [B] of each block."""
    out = []
    for t in tensors:
        idx = chosen.view(-1, *([1] * (t.dim() - 1))).expand(-1, 1, *t.shape[2:])
        out.append(t.gather(1, idx).squeeze(1))
    return out


def _sequential_best(sumlx: torch.Tensor, suml2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (scale, chosen trial) [B] of trials [B, T] as the C loops pick them.

    Trial 0 gives scale = Σlx/Σl² (0 if Σl² = 0) and best = scale·Σlx; a later trial replaces it
    when Σl² > 0 and (Σlx)² > best·Σl², in this order, with the same float32 operations.
    """
    s0, l0 = sumlx[:, 0], suml2[:, 0]
    scale = torch.where(l0 > 0, s0 / torch.where(l0 > 0, l0, 1), 0.0)
    best = scale * s0
    chosen = torch.zeros_like(s0, dtype=torch.long)
    for t in range(1, sumlx.shape[1]):
        st, lt = sumlx[:, t], suml2[:, t]
        acc = (lt > 0) & (st * st > best * lt)
        scale = torch.where(acc, st / torch.where(lt > 0, lt, 1), scale)
        best = torch.where(acc, scale * st, best)
        chosen = torch.where(acc, t, chosen)
    return scale, chosen


def make_qx_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (scale [B], L [B, n] in 0..2·nmax-1) of a symmetric grid ``scale·(L - nmax)`` (rmse_type 1).

    Weights default to x² (llama.cpp's rmse_type 1 without quant weights). Trials: -nmax/max, then
    -(nmax + 0.1·is)/max for is = -9..9; the one maximising (Σwxl)²/Σwl² wins.
    """
    w = x * x if weights is None else weights
    mx = signed_absmax(x)
    dead = mx.abs() < GROUP_MAX_EPS
    safe = torch.where(dead, torch.ones_like(mx), mx)
    steps = torch.tensor([0.0] + [float(i) for i in range(-9, 10) if i], dtype=torch.float32)
    iscale = -(nmax + 0.1 * steps)[None, :] / safe[:, None]  # [B, T]
    # laid out [n, B, T] so the C-order sums over n run on contiguous slices without a copy
    xt, wt = x.T.contiguous()[:, :, None], w.T.contiguous()[:, :, None]
    ell = torch.round(iscale[None] * xt).clamp_(-nmax, nmax - 1)
    sumlx = sum_first((wt * xt) * ell)
    suml2 = sum_first(wt * ell * ell)
    scale, chosen = _sequential_best(sumlx, suml2)
    (isc,) = _take(chosen, iscale[:, :, None])  # the chosen trial's codes, recomputed by the same ops
    ell = torch.round(isc * x).clamp_(-nmax, nmax - 1)
    scale = torch.where(dead, 0.0, scale)
    codes = torch.where(dead[:, None], 0.0, ell + nmax)
    return scale, codes


def _descend(
    xt: torch.Tensor, wt: torch.Tensor, ell: torch.Tensor, lo: float | None, hi: float, qp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (Σwxl, Σwl²) [B] after 5 rounds of llama.cpp's coordinate descent on codes ell [n, B] (in place).

    Each code in turn is moved to round(x·Σwl²/Σwxl) of the others and kept if (Σwxl)²/Σwl² grows.
    ``make_q3_quants`` (qp False) needs Σwxl > 0 and the new Σwl² > 0; ``make_qp_quants`` (qp True)
    needs both sums of the others > 0 and caps codes only from above.
    """
    wxt = wt * xt
    sumlx = sum_first(wxt * ell)
    suml2 = sum_first(wt * ell * ell)
    for _ in range(5):
        for i in range(xt.shape[0]):
            li, wi, wxi = ell[i], wt[i], wxt[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if qp else slx > 0
            new = torch.round(xt[i] * sl2 / torch.where(ok, slx, 1)).clamp_(min=lo, max=hi)
            slx2 = slx + wxi * new
            sl22 = sl2 + wi * new * new
            acc = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not qp:
                acc &= sl22 > 0
            ell[i] = torch.where(acc, new, li)
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
    return sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (scale [B], L [B, n] in 0..2·nmax-1): ``make_q3_quants`` with do_rmse (5 rounds of coordinate descent)."""
    mx = signed_absmax(x)
    dead = mx.abs() < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(dead, torch.ones_like(mx), mx))
    xt = x.T.contiguous()
    ell = torch.round(iscale[None, :] * xt).clamp_(-nmax, nmax - 1)
    sumlx, suml2 = _descend(xt, xt * xt, ell, -nmax, nmax - 1, qp=False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), 0.0)
    return torch.where(dead, 0.0, scale), torch.where(dead[:, None], 0.0, ell.T + nmax)


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    guarded: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give (scale [B], the_min [B] ≥ 0, L [B, n] in 0..nmax) of an affine grid ``scale·L - the_min``.

    ``make_qkx2_quants`` (guarded False) and ``make_qkx3_quants`` (guarded True: codes of v ≤ 0 are
    0 and v is capped at nmax before rounding). Each trial re-fits scale and min by weighted least
    squares and is kept if its weighted error is lower; later trials start from the kept minimum.
    """
    mn = x.min(dim=1).values.clamp(max=0.0)
    mx = x.max(dim=1).values
    dead = mx <= mn
    # laid out [n, B]: every C-order sum over n adds contiguous rows
    xt, wt = x.T.contiguous(), weights.T.contiguous()
    sum_w = sum_first(wt)
    sum_x = sum_first(wt * xt)

    def err_of(scale: torch.Tensor, lo: torch.Tensor, ell: torch.Tensor) -> torch.Tensor:
        diff = scale[None, :] * ell + lo[None, :] - xt
        return sum_first(wt * (diff.abs() if use_mad else diff * diff))

    rng = torch.where(dead, torch.ones_like(mx), mx - mn)
    iscale = rdiv(nmax, rng)
    scale = 1 / iscale
    ell = torch.round(iscale[None, :] * (xt - mn[None, :])).clamp_(0, nmax)
    best = err_of(scale, mn, ell)
    lo = mn
    sums = torch.empty(xt.shape[0], 3, xt.shape[1])  # [n, (Σwl, Σwl², Σwlx), B]: one in-order sum for all three
    for step in range(nstep + 1):
        isc = rdiv(float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)), mx - lo)
        v = isc[None, :] * (xt - lo[None, :])
        if guarded:
            cand = torch.where(v > 0, torch.round(torch.clamp(v, max=float(nmax))), 0.0)
        else:
            cand = torch.round(v).clamp_(0, nmax)
        cand = torch.nan_to_num(cand, nan=0.0)
        torch.mul(wt, cand, out=sums[:, 0])
        torch.mul(sums[:, 0], cand, out=sums[:, 1])
        torch.mul(sums[:, 0], xt, out=sums[:, 2])
        sum_l, sum_l2, sum_xl = sum_first(sums)
        d = sum_w * sum_l2 - sum_l * sum_l
        d_safe = torch.where(d > 0, d, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / d_safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d_safe
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1), this_scale)
        this_min = torch.where(pos, 0.0, this_min)
        cur = err_of(this_scale, this_min, cand)
        acc = (d > 0) & (cur < best) & ~dead
        ell = torch.where(acc[None, :], cand, ell)
        best = torch.where(acc, cur, best)
        scale = torch.where(acc, this_scale, scale)
        lo = torch.where(acc, this_min, lo)
    scale = torch.where(dead, 0.0, scale)
    ell = torch.where(dead[None, :], 0.0, ell)
    return scale, -lo, ell.T


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (scale [B], L [B, n] in 0..nmax) of a non-negative grid ``scale·L`` for non-negative x.

    llama.cpp quantizes the sub-block scales and mins of K-quants with this when an imatrix is given:
    a search over 9 scales by weighted MSE, then 5 rounds of coordinate descent.
    """
    mx = x.max(dim=1).values.clamp(min=0.0)
    dead = mx < GROUP_MAX_EPS
    safe = torch.where(dead, torch.ones_like(mx), mx)
    steps = torch.tensor([0.0] + [float(i) for i in range(-4, 5) if i], dtype=torch.float32)
    isc = (0.1 * steps + nmax)[None, :] / safe[:, None]  # [B, T]
    xt, wt = x.T.contiguous(), weights.T.contiguous()
    ell = torch.round(isc[None] * xt[:, :, None])  # [n, B, T]
    ell[:, :, 1:] = ell[:, :, 1:].clamp(max=nmax)  # the first (reference) trial is not capped in the C code
    diff = xt[:, :, None] - (1 / isc)[None] * ell
    mse = sum_first(wt[:, :, None] * diff * diff)
    (isc_best,) = _take(mse.argmin(dim=1), isc[:, :, None])  # C keeps the first strictly smaller
    ell = torch.round(isc_best[None, :, 0] * xt).clamp_(max=nmax)
    sumlx, suml2 = _descend(xt, wt, ell, None, nmax, qp=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), 0.0)
    return torch.where(dead, 0.0, scale), torch.where(dead[:, None], 0.0, ell.T)


def nearest_level(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Give the index of the nearest level (ties to the upper one, as ``best_index_int8``).

    For integer levels (IQ4_NL's table) every midpoint is a multiple of 1/2, so the index is a
    table lookup on floor(2t); other levels use a binary search.
    """
    if not torch.equal(levels, levels.round()):
        return torch.bucketize(t, (levels[1:] + levels[:-1]) / 2, right=True)
    twice_mid = (levels[1:] + levels[:-1]).long()  # 2 · midpoints, integers
    lo, hi = int(twice_mid[0]) - 1, int(twice_mid[-1])
    table = torch.searchsorted(twice_mid, torch.arange(lo, hi + 1), right=True)
    m = torch.floor(2 * t).nan_to_num_(0.0).clamp_(lo, hi).long() - lo
    return table[m]


def iq4_nl_scale(x: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Give each block's scale d [B] for the non-linear grid ``d·values`` (``quantize_row_iq4_nl_impl``).

    Start from d = max/|values[0]| and a least-squares refit, then try 1/d = (itry + values[0])/max for
    itry = -ntry..ntry, keeping the refit that maximises (Σwqx)²/Σwq².
    """
    mx = signed_absmax(x)
    dead = mx.abs() < GROUP_MAX_EPS
    safe = torch.where(dead, torch.ones_like(mx), mx)
    v0 = float(values[0])
    id0 = 1 / (-safe / v0)
    ids = torch.cat(
        [id0[:, None], (torch.arange(-ntry, ntry + 1, dtype=torch.float32)[None, :] + v0) / safe[:, None]], 1
    )
    # laid out [n, B, T] so the C-order sums over n run on contiguous slices without a copy
    xt = x.T.contiguous()[:, :, None]
    q = values[nearest_level(ids[None] * xt, values)]
    wq = weights.T.contiguous()[:, :, None] * q
    sumqx, sumq2 = sum_first(wq * xt), sum_first(wq * q)
    d, _ = _sequential_best(sumqx, sumq2)
    return torch.where(dead, 0.0, d)
