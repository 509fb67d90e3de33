"""Per-token log-probabilities and entropy from vocabulary-parallel logits.

Each TP rank holds logits for a contiguous slice of the vocabulary. The sums over the vocabulary are all-reduced
with Megatron's `reduce_from_tensor_model_parallel_region` (forward: all-reduce; backward: identity), which is
the correct gradient because every TP rank computes the same loss from the reduced values.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool,
                         vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [b, s, V/tp] (this rank's vocab slice), labels [b, s] global token ids.

    Returns log p(label) [b, s] and, if asked, the entropy of p [b, s], where p = softmax(logits / temperature):
    the distribution the engine sampled from (vLLM's processed logprobs). `vocab_size`: the true vocabulary when
    Megatron's is padded (`--make-vocab-size-divisible-by`); columns at or past it get probability 0 (no weight
    can make a logit -inf, so they are masked here).
    """
    logits = logits.float()
    if temperature != 1.0:  # x / 1 is x, bit for bit: skip a pass over the logits and one in the backward
        logits = logits / temperature
    vocab_local = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    group = parallel_state.get_tensor_model_parallel_group()
    padded = None
    if vocab_size is not None and start + vocab_local > vocab_size:
        padded = torch.arange(start, start + vocab_local, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))

    # The shift only stabilises exp(); log-sum-exp is invariant to it, so it needs no gradient.
    shift = logits.detach().max(dim=-1).values
    torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX, group=group)
    z = logits - shift.unsqueeze(-1)
    exp_z = z.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp_z.sum(dim=-1))
    log_sum_exp = sum_exp.log()

    local = labels - start
    in_slice = (local >= 0) & (local < vocab_local)
    target_z = z.gather(-1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    # where, not a product: a clamped index may land on a padded (-inf) column, and -inf * 0 is nan.
    target_z = reduce_from_tensor_model_parallel_region(torch.where(in_slice, target_z, 0.0))
    logprobs = target_z - log_sum_exp

    entropy = None
    if with_entropy:
        # H = log Z - E_p[z]; padded columns contribute 0 (not 0 * -inf), also to the gradient.
        z_finite = z if padded is None else z.masked_fill(padded, 0.0)
        expected_z = reduce_from_tensor_model_parallel_region((exp_z * z_finite).sum(dim=-1)) / sum_exp
        entropy = log_sum_exp - expected_z
    return logprobs, entropy


# The fused head's budget for its [chunk, vocab/TP] fp32 temporaries (all of them together, forward or backward).
CHUNK_BYTES = 256 << 20


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, temperature: float,
                      with_entropy: bool, vocab_size: int | None = None,
                      chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused loss head: log p(label) and, if asked, the entropy of p [b, R] at the response positions `index`
    [b, R] (positions into the sequence) of logits [b, s, V/tp] with labels [b, s]; p and `vocab_size` as in
    `logprobs_and_entropy`, whose values this computes (the same operations per element), over the response
    positions only, a chunk of positions at a time, with a closed-form backward.

    Memory: beside the logits, only per-position scalars are kept for the backward, and the [chunk, V/tp] fp32
    temporaries stay within `chunk_bytes`. The backward writes the gradient into the logits' own storage (as
    Megatron's cross entropy does: zeros off the response positions), so the logits must not be read after it.
    An entropy the caller detaches (a metric, not a loss term) gets no backward at all.
    """
    b, s, vocab_local = logits.shape
    rows = (torch.arange(b, device=logits.device).unsqueeze(1) * s + index).flatten()
    # Padding slots of `index` repeat a position: each position is computed once, its gradients summed.
    rows, inverse = torch.unique(rows, return_inverse=True)
    num_buffers = 2 if with_entropy else 1
    chunk_rows = max(1, chunk_bytes // (num_buffers * vocab_local * 4))
    logp, entropy = _FusedHead.apply(logits, rows, labels.flatten()[rows], temperature, with_entropy, vocab_size,
                                     chunk_rows)
    return logp[inverse].view(b, -1), entropy[inverse].view(b, -1) if with_entropy else None


class _VocabSlice:
    """This rank's slice of the vocabulary, and how to turn rows of its logits into the scaled, masked fp32 x."""

    def __init__(self, vocab_local: int, temperature: float, vocab_size: int | None, device: torch.device) -> None:
        self.size = vocab_local
        self.start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.distributed = parallel_state.get_tensor_model_parallel_world_size() > 1
        self.temperature = temperature
        self.padded = None
        if vocab_size is not None and self.start + vocab_local > vocab_size:
            self.padded = torch.arange(self.start, self.start + vocab_local, device=device) >= vocab_size

    def scaled(self, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), V/tp] fp32: the rows' logits / temperature, -inf on padded columns (a fresh buffer)."""
        x = flat.index_select(0, rows).float()
        if self.temperature != 1.0:  # x / 1 is x, bit for bit
            x.div_(self.temperature)
        if self.padded is not None:
            x.masked_fill_(self.padded, float("-inf"))
        return x

    def all_reduce(self, t: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=op, group=self.group)
        return t

    def local_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column of each label in this slice (clamped into it), and whether it lies in the slice."""
        local = labels - self.start
        return local.clamp(0, self.size - 1).unsqueeze(-1), (local >= 0) & (local < self.size)


class _FusedHead(torch.autograd.Function):
    """Rows `rows` of logits [b, s, V/tp] viewed as [b * s, V/tp]. With z = x - max(x) (x = logits / T, the max
    over the whole vocabulary): log p(label) = z_label - log Z and H = log Z - E_p[z], where Z = sum exp(z). Saved
    for the backward: the logits (no copy) and per row max(x), log Z and E_p[z]; p is recomputed chunk by chunk:
        d log p(label) / d z_j = 1[j = label] - p_j,    d H / d z_j = -p_j (z_j - E_p[z]),    d z / d logits = 1 / T.
    Across tensor parallelism, the forward all-reduces max, Z, z_label and sum exp(z) z; the backward is local."""

    @staticmethod
    def forward(ctx, logits, rows, labels, temperature, with_entropy, vocab_size, chunk_rows):
        vocab = _VocabSlice(logits.size(-1), temperature, vocab_size, logits.device)
        flat = logits.view(-1, vocab.size)
        shift, log_sum_exp, expected_z = (torch.empty(rows.numel(), device=logits.device) for _ in range(3))
        logp = torch.empty_like(shift)
        for c in range(0, rows.numel(), chunk_rows):
            part = slice(c, c + chunk_rows)
            z = vocab.scaled(flat, rows[part])
            # The shift only stabilises exp(); log-sum-exp is invariant to it.
            shift[part] = vocab.all_reduce(z.max(dim=-1).values, torch.distributed.ReduceOp.MAX)
            z.sub_(shift[part].unsqueeze(-1))
            local, in_slice = vocab.local_labels(labels[part])
            # where, not a product: a clamped index may land on a padded (-inf) column, and -inf * 0 is nan.
            target_z = vocab.all_reduce(torch.where(in_slice, z.gather(-1, local).squeeze(-1), 0.0))
            if with_entropy:
                exp_z = z.exp()
                sum_exp = vocab.all_reduce(exp_z.sum(dim=-1))
                if vocab.padded is not None:  # padded columns contribute 0 (not 0 * -inf)
                    z.masked_fill_(vocab.padded, 0.0)
                expected_z[part] = vocab.all_reduce(exp_z.mul_(z).sum(dim=-1)) / sum_exp
            else:
                sum_exp = vocab.all_reduce(z.exp_().sum(dim=-1))
            log_sum_exp[part] = sum_exp.log()
            logp[part] = target_z - log_sum_exp[part]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, rows, labels, shift, log_sum_exp, expected_z)
        ctx.temperature, ctx.vocab_size, ctx.chunk_rows = temperature, vocab_size, chunk_rows
        return logp, log_sum_exp - expected_z if with_entropy else logp.new_empty(0)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, rows, labels, shift, log_sum_exp, expected_z = ctx.saved_tensors
        vocab = _VocabSlice(logits.size(-1), ctx.temperature, ctx.vocab_size, logits.device)
        flat = logits.view(-1, vocab.size)
        if grad_logp is None:
            grad_logp = torch.zeros_like(shift)
        for c in range(0, rows.numel(), ctx.chunk_rows):
            part = slice(c, c + ctx.chunk_rows)
            z = vocab.scaled(flat, rows[part]).sub_(shift[part].unsqueeze(-1))
            g_logp = grad_logp[part].unsqueeze(-1)
            if grad_entropy is None:  # -p g_logp
                grad = z.sub_(log_sum_exp[part].unsqueeze(-1)).exp_().mul_(-g_logp)
            else:  # -p (g_logp + g_H (z - E_p[z]))
                p = (z - log_sum_exp[part].unsqueeze(-1)).exp_()
                grad = z.sub_(expected_z[part].unsqueeze(-1)).mul_(grad_entropy[part].unsqueeze(-1))
                grad = grad.add_(g_logp).mul_(p).neg_()
                del p
                if vocab.padded is not None:  # p = 0 there, times -inf
                    grad.masked_fill_(vocab.padded, 0.0)
            local, in_slice = vocab.local_labels(labels[part])
            grad.scatter_add_(-1, local, torch.where(in_slice.unsqueeze(-1), g_logp, 0.0))
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            flat.index_copy_(0, rows[part], grad.to(flat.dtype))
        elsewhere = torch.ones(flat.size(0), dtype=torch.bool, device=flat.device)
        elsewhere[rows] = False
        flat.masked_fill_(elsewhere.unsqueeze(-1), 0.0)
        return logits, None, None, None, None, None, None
