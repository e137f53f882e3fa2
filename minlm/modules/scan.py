"""Scans of the recurrent mixers: the step-by-step references and the fast training forms.

Two recurrences run through here:

- the diagonal linear recurrence h_t = a_t * h_{t-1} + b_t of the MLGRU and Griffin's RG-LRU
  (a, b, h: (B, T, C)); ``linear_scan_reference`` is the loop a learner reads,
  ``linear_scan`` the log-depth parallel (Hillis-Steele) scan, and ``linear_scan_fused``
  the loop with a hand-written backward: one fused multiply-add per position each way. (A
  chunked form from cumulative log-decays, a lower-triangular (L, L) decay matrix per channel
  and chunk, measured 4-6x slower than the parallel scan on a CPU at llama-1m sizes: with a
  decay per channel its work is element-wise, L times the scan's, not matrix products.)
- Mamba's selective scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = C_t . h_t with a
  state (B, E, N) per token; ``selective_scan_reference`` is the loop, ``selective_scan``
  a hand-written forward and backward that takes the contractions with B and C as batched
  matrix products over chunks of positions and keeps the per-position recurrence to one
  fused multiply-add, where autograd over the loop runs about a dozen element-wise kernels
  per position and keeps every intermediate.

Hand-written: the field's kernels for these scans (mamba-ssm, flash-linear-attention) need
CUDA/Triton; these run on any device. Each fast form is proven equal to its reference in
values and gradients by the registry-generated tests (``tests/test_mixers.py``), for every
option the mixers declare.

Dimension letters: B batch, T time, C channels, L chunk length, E inner width, N state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- the diagonal linear recurrence -------------------------------------------------------


def linear_scan_reference(a: torch.Tensor, b: torch.Tensor,
                          h0: torch.Tensor | None = None) -> torch.Tensor:
    """All h_t of h_t = a_t * h_{t-1} + b_t along dim 1, one position at a time.

    a, b: (B, T, C); h0: (B, C) or None (zeros). Returns (B, T, C)."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]  # (B, C)
        out.append(h)
    return torch.stack(out, dim=1)


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All h_t of h_t = a_t * h_{t-1} + b_t along dim 1, in ceil(log2 T) vectorised steps.

    a, b: (B, T, C); h0: (B, C) or None (zeros). Hillis-Steele scan of the associative pairs
    (a, b): after the step with offset d, (a_t, b_t) summarise steps t-2d+1..t.
    """
    T = a.shape[1]
    d = 1
    while d < T:
        b = b + a * F.pad(b[:, :-d], (0, 0, d, 0))  # (B, T, C): b_{t-d}, zero before the start
        a = a * F.pad(a[:, :-d], (0, 0, d, 0), value=1.0)  # (B, T, C): a_{t-d}, one before it
        d *= 2
    if h0 is not None:
        b = b + a * h0.unsqueeze(1)  # (B, T, C): a now holds the products a_1 ... a_t
    return b


class _LinearScan(torch.autograd.Function):
    """``linear_scan_reference`` with a hand-written backward, time-major (T, B, C): one fused
    multiply-add per position forward, one per position backward (G_t = g_t + a_{t+1} G_{t+1}),
    where the parallel scan makes 2 log2 T passes over the whole sequence each way."""

    @staticmethod
    def forward(ctx, a, b, h0):
        a_t = a.transpose(0, 1).contiguous()  # (T, B, C)
        hs = b.transpose(0, 1).contiguous()  # (T, B, C): b_t, then h_t
        h = h0
        for t in range(hs.shape[0]):
            if h is not None:
                hs[t].addcmul_(a_t[t], h)
            h = hs[t]
        ctx.save_for_backward(a_t, hs, h0)
        return hs.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        a_t, hs, h0 = ctx.saved_tensors
        G = grad.transpose(0, 1).contiguous()  # (T, B, C): d loss / d h_t, accumulated
        for t in range(G.shape[0] - 2, -1, -1):
            G[t].addcmul_(a_t[t + 1], G[t + 1])
        g_a = torch.empty_like(G)
        torch.mul(G[1:], hs[:-1], out=g_a[1:])  # d loss / d a_t = G_t h_{t-1}
        if h0 is None:
            g_a[0].zero_()
        else:
            torch.mul(G[0], h0, out=g_a[0])
        g_h0 = a_t[0] * G[0] if h0 is not None and ctx.needs_input_grad[2] else None
        return g_a.transpose(0, 1), G.transpose(0, 1), g_h0


def linear_scan_fused(a: torch.Tensor, b: torch.Tensor,
                      h0: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_scan_reference`` (same arguments and result), with a hand-written backward."""
    return _LinearScan.apply(a, b, h0)


LINEAR_SCANS = {"fused": linear_scan_fused, "parallel": linear_scan,
                "reference": linear_scan_reference}


# --- Mamba's selective scan -------------------------------------------------------------


def selective_scan_reference(dt: torch.Tensor, A: torch.Tensor, u: torch.Tensor,
                             Bm: torch.Tensor, Cm: torch.Tensor,
                             h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + u_t B_t, one position at a time.

    dt, u: (B, T, E) step sizes and step-scaled inputs (dt * x); A: (E, N); Bm, Cm:
    (B, T, N); h0: (B, E, N) or None (zeros). Returns y (B, T, E) and the last state h_T."""
    Bsz, T, E = u.shape
    h = u.new_zeros(Bsz, E, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t].unsqueeze(-1) * A)  # (B, E, N)
        h = decay * h + u[:, t].unsqueeze(-1) * Bm[:, t].unsqueeze(1)  # (B, E, N)
        ys.append((h * Cm[:, t].unsqueeze(1)).sum(-1))  # (B, E)
    return torch.stack(ys, dim=1), h


SCAN_ELEMENTS = 1 << 18  # state values per chunk of the fast scan (1 MB in fp32): cache-sized
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x log2 e); exp2 runs faster on common CPUs


def _chunk_length(Bsz: int, E: int, N: int, chunk: int) -> int:
    return chunk or max(1, SCAN_ELEMENTS // (Bsz * E * N))


class _SelectiveScan(torch.autograd.Function):
    """``selective_scan_reference`` with a hand-written backward, chunk by chunk.

    Works time-major with the state transposed, (L, B, N, E), so that one position's state is
    contiguous and every contraction over N is a matrix product with E as its long side. A
    chunk's decays and states live in two cache-sized buffers reused for every chunk; only
    the state entering each chunk is saved, and the backward recomputes the chunk from it.
    (Writing all T states to fresh memory, as autograd over the loop does, costs more than
    computing them twice.)"""

    @staticmethod
    def forward(ctx, dt, A, u, Bm, Cm, h0, chunk):
        Bsz, T, E = u.shape
        N = A.shape[1]
        dt_t, u_t = dt.transpose(0, 1).contiguous(), u.transpose(0, 1).contiguous()  # (T, B, E)
        B_t, C_t = Bm.transpose(0, 1).contiguous(), Cm.transpose(0, 1).contiguous()  # (T, B, N)
        A2 = (A * LOG2_E).t().contiguous()  # (N, E)
        L = min(_chunk_length(Bsz, E, N, chunk), T)
        decay, hs = u.new_empty(L, Bsz, N, E), u.new_empty(L, Bsz, N, E)
        y = torch.empty_like(u_t)  # (T, B, E)
        starts = range(0, T, L)
        entering = u.new_empty(len(starts), Bsz, N, E)  # the state entering each chunk
        h = None if h0 is None else h0.transpose(1, 2)  # (B, N, E)
        for i, s in enumerate(starts):
            n = min(L, T - s)
            if h is None:
                entering[i].zero_()
            else:
                entering[i].copy_(h)  # before the buffers it may view are overwritten
            h = _chunk_states(dt_t[s:s + n], A2, u_t[s:s + n], B_t[s:s + n],
                              None if h is None else entering[i], decay[:n], hs[:n])
            # y_t = C_t . h_t for the chunk: (n B, 1, N) @ (n B, N, E)
            torch.matmul(C_t[s:s + n].reshape(-1, 1, N), hs[:n].view(-1, N, E),
                         out=y[s:s + n].view(-1, 1, E))
        ctx.save_for_backward(dt_t, A2, u_t, B_t, C_t, entering)
        ctx.chunk, ctx.has_h0 = L, h0 is not None
        ctx.set_materialize_grads(False)
        return y.transpose(0, 1), h.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gy, g_last):
        dt_t, A2, u_t, B_t, C_t, entering = ctx.saved_tensors
        T, Bsz, E = u_t.shape
        N, L = A2.shape[0], ctx.chunk
        gy_t = u_t.new_zeros(T, Bsz, E) if gy is None else gy.transpose(0, 1).contiguous()
        g_dt, g_u = torch.empty_like(dt_t), torch.empty_like(u_t)
        g_B, g_C = torch.empty_like(B_t), torch.empty_like(C_t)
        g_A = torch.zeros_like(A2)  # (N, E): d loss / d A, transposed
        hs = u_t.new_empty(L, Bsz, N, E)
        # two of each, used by turns: the chunk after keeps its first G and decay for this one
        decays, Gs = [[u_t.new_empty(L, Bsz, N, E) for _ in range(2)] for _ in range(2)]
        ones = u_t.new_ones(1, 1, N)
        G_next = None if g_last is None else g_last.transpose(1, 2)  # d loss / d h_T: (B, N, E)
        decay_next = None  # exp(dt_{t+1} A): how h_t reaches h_{t+1}
        starts = list(range(0, T, L))
        for i in reversed(range(len(starts))):
            s = starts[i]
            n = min(L, T - s)
            first = i == 0 and not ctx.has_h0  # the state before it is zero
            h_in = None if first else entering[i]
            decay, G = decays[i % 2], Gs[i % 2]
            _chunk_states(dt_t[s:s + n], A2, u_t[s:s + n], B_t[s:s + n], h_in, decay[:n],
                          hs[:n])
            Gc = G[:n]
            # G_t = d loss / d h_t: C_t gy_t from y_t, plus decay_{t+1} G_{t+1} from h_{t+1}
            torch.mul(C_t[s:s + n].unsqueeze(-1), gy_t[s:s + n].unsqueeze(2), out=Gc)
            for t in range(n - 1, -1, -1):
                if G_next is not None:
                    if decay_next is None:  # h_T itself was returned
                        Gc[t].add_(G_next)
                    else:
                        Gc[t].addcmul_(decay_next, G_next)
                G_next, decay_next = Gc[t], decay[t]
            G_next = G_next.clone()  # G is overwritten below (decay is kept a turn)
            Gf = Gc.view(-1, N, E)  # (n B, N, E)
            torch.matmul(B_t[s:s + n].reshape(-1, 1, N), Gf, out=g_u[s:s + n].view(-1, 1, E))
            # g_B_t = G_t . u_t and g_C_t = h_t . gy_t over E, the products written to the
            # other G buffer (free now) rather than to fresh memory, as vecdot would
            spare = Gs[(i + 1) % 2][:n]
            torch.sum(torch.mul(Gc, u_t[s:s + n].unsqueeze(2), out=spare), -1, out=g_B[s:s + n])
            torch.sum(torch.mul(hs[:n], gy_t[s:s + n].unsqueeze(2), out=spare), -1,
                      out=g_C[s:s + n])
            # q = d loss / d (dt A) = G_t h_{t-1} exp(dt_t A), in place over G
            Gc[1:].mul_(hs[:n - 1])
            if first:
                Gc[0].zero_()
            else:
                Gc[0].mul_(h_in)
            Gc.mul_(decay[:n])  # (n, B, N, E)
            g_A += torch.mul(Gc, dt_t[s:s + n].unsqueeze(2), out=hs[:n]).sum((0, 1))
            Gc.mul_(A2)
            torch.matmul(ones.expand(Gf.shape[0], 1, N), Gf,
                         out=g_dt[s:s + n].view(-1, 1, E))  # sum over N
        g_dt.div_(LOG2_E)  # A2 carried log2 e
        g_h0 = None
        if ctx.has_h0 and ctx.needs_input_grad[5]:
            g_h0 = (decay_next * G_next).transpose(1, 2) if G_next is not None \
                else u_t.new_zeros(Bsz, E, N)
        return (g_dt.transpose(0, 1), g_A.t(), g_u.transpose(0, 1), g_B.transpose(0, 1),
                g_C.transpose(0, 1), g_h0, None)


def _chunk_states(dt, A2, u, Bm, h, decay, hs) -> torch.Tensor:
    """Fill ``decay`` (n, B, N, E) with exp(dt_t A) and ``hs`` with the states of a chunk
    entered with state ``h`` (B, N, E) or None (zeros); returns the last state (a view)."""
    torch.mul(dt.unsqueeze(2), A2, out=decay).exp2_()
    torch.mul(Bm.unsqueeze(-1), u.unsqueeze(2), out=hs)  # u_t B_t
    for t in range(dt.shape[0]):
        if h is not None:
            hs[t].addcmul_(decay[t], h)
        h = hs[t]
    return h


def selective_scan(dt: torch.Tensor, A: torch.Tensor, u: torch.Tensor, Bm: torch.Tensor,
                   Cm: torch.Tensor, h0: torch.Tensor | None = None,
                   chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_scan_reference`` (same arguments and results), fast: chunks of ``chunk``
    positions (0: as many as fill ``SCAN_ELEMENTS`` state values)."""
    return _SelectiveScan.apply(dt, A, u, Bm, Cm, h0, chunk)
