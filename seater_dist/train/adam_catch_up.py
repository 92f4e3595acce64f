"""torch's Adam (no weight decay) and AdamW (decoupled weight decay) steps on table rows that got no gradient,
in closed form: applied when a row is next read or updated, so that a step costs the rows it touches, not the
table (docs/method.md §4).

A row last updated at step s, with moments m and v then (x = sqrt(v)), gets at each skipped step u = s+1..t

    m <- beta1 * m,   v <- beta2 * v,   p <- a_u * p - lr_u / (1 - beta1**u) * m / (sqrt(v / (1 - beta2**u)) + eps)

with a_u = 1 - lr_u * weight_decay (AdamW, rounded as torch's ``mul_`` applies it; 1 for Adam).
Unrolled, with A_u = a_1 * ... * a_u::

    p_t = (A_t / A_s) * (p_s - sum_u (A_s / A_u) * c_u * m / (C_u * x + eps))
    c_u = lr_u * beta1**(u-s) / (1 - beta1**u),   C_u = beta2**((u-s)/2) / sqrt(1 - beta2**u)

The sum is not geometric (bias corrections, eps inside the square-root denominator): expanded in powers of
eps / (C_u x) it is ``sum_p (-eps)**(p-1) * F_p(s, t) * m / x**p`` with per-step scalars

    F_p(s, t) = sum_u (A_s / A_u) * lr_u * (1 - beta2**u)**(p/2) / (1 - beta1**u) * rho_p**(u-s),
    rho_p = beta1 / beta2**(p/2),

which depend on the row only through s. They are kept for every s since the last full catch-up; each step
adds its term to the last ``window`` of them (older ones no longer change: rho_p**window < 1e-20, and A_s / A_u
is within a factor (1 - lr * weight_decay)**-window of 1). log A_u is kept too (float64, relative to the last
full catch-up), so that A_t / A_s never under- or overflows however long a row waits.
"""

from __future__ import annotations

import math

import torch


class AdamCatchUp:
    """The skipped Adam/AdamW steps of a table's rows, applied in closed form (module docstring).

    ORDERS terms of the series are used where eps / x <= SERIES_LIMIT; the few elements with a smaller x (a
    gradient near eps) get the sum itself over their first ``window`` skipped steps. Everything is float64.

    With coupled L2 (torch.optim.Adam's weight_decay) a skipped step's gradient is ``weight_decay * row``,
    which depends on the row itself: no closed form exists, so this serves Adam without weight decay and
    AdamW (``weight_decay``: its decoupled decay) only.
    """

    ORDERS = 16
    SERIES_LIMIT = 1 / 4

    def __init__(self, num_rows: int, beta1: float, beta2: float, eps: float, device: torch.device,
                 weight_decay: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        # torch's mul_ applies AdamW's factor in the table's computation type: float32 unless the table is float64
        self.factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rhos = [beta1 / beta2 ** (p / 2) for p in range(1, self.ORDERS + 1)]
        if not max(rhos) < 1:
            raise ValueError(f"closed-form catch-up needs beta1 < beta2**{self.ORDERS / 2}, got ({beta1}, {beta2})")
        self.window = math.ceil(-20 * math.log(10) / math.log(max(rhos)))
        # The per-step scalars live on the host (float64 [ORDERS, steps]); only the rows' state is on ``device``.
        steps_back = torch.arange(self.window, 0, -1, dtype=torch.float64, device="cpu")
        self.powers = torch.stack([rho**steps_back for rho in rhos])  # [ORDERS, window]: rho**window .. rho**1
        self.half_orders = torch.arange(1, self.ORDERS + 1, dtype=torch.float64, device="cpu") / 2  # p / 2
        self.last = torch.zeros(num_rows, dtype=torch.long, device=device)  # step each row is up to date with
        self.step = 0
        self.origin = 0
        self.acc = torch.zeros(self.ORDERS, 1024, dtype=torch.float64, device="cpu")  # F_p(s) at [p - 1, s - origin]
        self.step_sizes = torch.zeros(1024, dtype=torch.float64, device="cpu")  # lr_u / (1 - beta1**u) at u - origin
        self.log_decay = torch.zeros(1024, dtype=torch.float64, device="cpu")  # log(A_u / A_origin) at u - origin

    def reset(self, step: int) -> None:
        """Every row is up to date with ``step`` (after a full catch-up, a dense step, or a resume)."""
        self.step = self.origin = step
        self.last.fill_(step)
        self.acc.zero_()
        self.log_decay[0] = 0.0

    def record_step(self, lr: float) -> None:
        """Account for step ``self.step + 1`` (learning rate ``lr``) on every row not updated by it."""
        factor = torch.tensor(1 - lr * self.weight_decay, dtype=self.factor_dtype).item()  # a_t as torch applies it
        if not factor > 0:
            raise ValueError(f"AdamW's decay factor 1 - lr * weight_decay must be positive, got lr {lr}, "
                             f"weight_decay {self.weight_decay}")
        self.step += 1
        t, origin = self.step, self.origin
        if t - origin >= self.step_sizes.numel():
            self.acc = torch.cat([self.acc, torch.zeros_like(self.acc)], dim=1)
            self.step_sizes = torch.cat([self.step_sizes, torch.zeros_like(self.step_sizes)])
            self.log_decay = torch.cat([self.log_decay, torch.zeros_like(self.log_decay)])
        self.step_sizes[t - origin] = lr / (1 - self.beta1**t)
        self.log_decay[t - origin] = self.log_decay[t - 1 - origin] + math.log(factor)
        first = max(origin, t - self.window)
        per_order = self.step_sizes[t - origin] * (1 - self.beta2**t) ** self.half_orders  # [ORDERS]
        terms = per_order[:, None] * self.powers[:, self.window - (t - first):]  # [ORDERS, t - first]
        if self.weight_decay:
            terms = terms * self._decay_between(self.log_decay[first - origin : t - origin], t)  # A_s / A_t
        self.acc[:, first - origin : t - origin] += terms

    def catch_up(self, rows: torch.Tensor, param: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor) -> None:
        """Bring ``rows`` (int64 [R], unique) of the table ``param`` [N, d] and its moments to ``self.step``."""
        rows = rows[self.last[rows] < self.step]
        if rows.numel() == 0:
            return
        last = self.last[rows]
        m, v = exp_avg[rows].double(), exp_avg_sq[rows].double()
        x = v.sqrt()
        ratio = self.eps / x.clamp_min(torch.finfo(torch.float64).tiny)  # [R, d]
        since = (last - self.origin).cpu()
        sums = self.acc[:, since].to(param.device)[:, :, None]  # [ORDERS, R, 1]
        series = sums[-1].expand_as(m)  # Horner: sum_p F_p * (-ratio)**(p-1)
        for p in range(self.ORDERS - 2, -1, -1):
            series = series * -ratio + sums[p]
        move = series * m / x.clamp_min(torch.finfo(torch.float64).tiny)
        near_eps = (ratio > self.SERIES_LIMIT) & (m != 0)
        if near_eps.any():
            r, c = near_eps.nonzero(as_tuple=True)
            move[r, c] = self._summed_move(last[r], m[r, c], x[r, c])
        move[x == 0] = 0  # never had a gradient: Adam leaves it where it is (AdamW only decays it)
        moved = param[rows].double() - move
        if self.weight_decay:  # the row's own decay over its skipped steps: A_t / A_s
            shrink = torch.exp(self.log_decay[self.step - self.origin] - self.log_decay[since])
            moved *= shrink.to(param.device)[:, None]
        param[rows] = moved.to(param.dtype)
        skipped = (self.step - last).to(torch.float64)[:, None]
        exp_avg[rows] = (m * self.beta1**skipped).to(exp_avg.dtype)
        exp_avg_sq[rows] = (v * self.beta2**skipped).to(exp_avg_sq.dtype)
        self.last[rows] = self.step

    def _decay_between(self, log_decay_s: torch.Tensor, u: torch.Tensor | int) -> torch.Tensor:
        """A_s / A_u (float64, on the host) from log A_s (``log_decay_s``, float64 [...]) and the step u (an
        int, or int64 [...] broadcasting with it): >= 1 for u >= s."""
        index = u - self.origin
        at_u = self.log_decay[index.cpu() if isinstance(index, torch.Tensor) else index]
        return torch.exp(log_decay_s - at_u)

    def _summed_move(self, last: torch.Tensor, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The move itself (before the row's own decay A_t / A_s), summed over the first ``window`` skipped
        steps, for elements (float64 [E]) whose x is too close to eps for the series: in order of their
        skipped steps, in chunks as wide as those."""
        out = torch.empty_like(m)
        skipped = (self.step - last).clamp(max=self.window)
        order = torch.argsort(skipped)
        for start in range(0, m.numel(), 4096):
            part = order[start : start + 4096]
            j = torch.arange(1, int(skipped[part].max()) + 1, device=m.device, dtype=torch.float64)
            u = last[part, None] + j.long()  # [E', columns] absolute steps
            valid = u <= self.step
            u = u.clamp(max=self.step)
            c = self.step_sizes[(u - self.origin).cpu()].to(m.device) * self.beta1**j
            if self.weight_decay:
                since = self.log_decay[(last[part] - self.origin).cpu()][:, None]
                c = c * self._decay_between(since, u).to(m.device)  # A_s / A_u
            big_c = self.beta2 ** (j / 2) / torch.sqrt(1 - self.beta2 ** u.double())
            terms = c * m[part, None] / (big_c * x[part, None] + self.eps)
            out[part] = torch.where(valid, terms, torch.zeros_like(terms)).sum(1)
        return out
