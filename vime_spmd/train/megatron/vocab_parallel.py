"""Per-token log-probabilities and entropy from vocabulary-parallel logits.

Each TP rank holds logits for a contiguous slice of the vocabulary. Two heads compute the same values:
`logprobs_and_entropy`, autograd over every position (the reference), and `response_logprobs`, the fused head the
actor uses (the response positions only, in chunks, with a closed-form backward). In the first, the sums over the
vocabulary are all-reduced with Megatron's `reduce_from_tensor_model_parallel_region` (forward: all-reduce; backward:
identity), which is the correct gradient because every TP rank computes the same loss from the reduced values.
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


# The fused head's budget for its [chunk, vocab/TP] fp32 temporaries (all of them together, forward or backward): on
# a CPU, chunks that stay in its caches run fastest; an accelerator wants few (each costs launches and collectives).
CHUNK_BYTES = {"cpu": 4 << 20, "accelerator": 256 << 20}


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, temperature: float,
                      with_entropy: bool, entropy_grad: bool = True, vocab_size: int | None = None,
                      chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused loss head: log p(label) and, if asked, the entropy of p [b, R] at the response positions `index`
    [b, R] (positions into the sequence) of logits [b, s, V/tp] with labels [b, s]; p and `vocab_size` as in
    `logprobs_and_entropy`, whose values this computes (the same operations per element), over the response
    positions only, a chunk of positions at a time, with a closed-form backward. `entropy_grad=False`: the entropy
    is a metric (no gradient), which makes the backward one pass.

    Memory: beside the logits, only per-position scalars are kept for the backward, and the [chunk, V/tp] fp32
    temporaries stay within `chunk_bytes` (default: CHUNK_BYTES for the device). With a graph, the logits' storage
    is the head's to use (as in Megatron's cross entropy): fp32 logits hold exp(z) of the response positions after
    the forward when the entropy gets no gradient, and the gradient after the backward (zeros off the response
    positions). Without a graph (the old-policy and reference passes) the logits stay as they are.
    """
    b, s, vocab_local = logits.shape
    rows = (torch.arange(b, device=logits.device).unsqueeze(1) * s + index).flatten()
    # Padding slots of `index` repeat a position: each position is computed once, its gradients summed.
    rows, inverse = torch.unique(rows, return_inverse=True)
    entropy_grad = with_entropy and entropy_grad
    # exp(z) is kept for the backward (in the logits, so no recompute) unless the entropy's gradient needs z too.
    keep_exp = torch.is_grad_enabled() and logits.requires_grad and logits.dtype == torch.float32 and not entropy_grad
    num_buffers = 2 if with_entropy else 1
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES["cpu" if logits.device.type == "cpu" else "accelerator"]
    chunks = _chunks(rows, max(1, chunk_bytes // (num_buffers * vocab_local * 4)))
    logp, entropy = _FusedHead.apply(logits, rows, labels.flatten()[rows], temperature, with_entropy, entropy_grad,
                                     keep_exp, vocab_size, chunks)
    return logp[inverse].view(b, -1), entropy[inverse].view(b, -1) if with_entropy else None


def _chunks(rows: torch.Tensor, chunk_rows: int) -> list[tuple[slice, int | None]]:
    """Consecutive pieces of the sorted `rows`, at most `chunk_rows` each: (its slice of `rows`, its first row when
    its rows are consecutive, else None). A run of consecutive rows (one sample's response) that does not fit into
    the chunk being filled is cut into whole chunks, each a plain view of the logits; short runs share a chunk."""
    breaks = (torch.nonzero(rows[1:] != rows[:-1] + 1).squeeze(-1) + 1).tolist()
    runs = zip([0, *breaks], [*breaks, rows.numel()], rows[[0, *breaks]].tolist() if rows.numel() else [])
    chunks = []
    begin, first_row = 0, None  # the chunk being filled: rows[begin:a], and its first row if it is one run
    for a, b, first in runs:
        if b - begin <= chunk_rows:  # the run joins it
            first_row = first if begin == a else None
            continue
        if a > begin:
            chunks.append((slice(begin, a), first_row))
        whole = (b - a) // chunk_rows
        chunks += [(slice(a + k * chunk_rows, a + (k + 1) * chunk_rows), first + k * chunk_rows) for k in range(whole)]
        begin, first_row = a + whole * chunk_rows, first + whole * chunk_rows
    if begin < rows.numel():
        chunks.append((slice(begin, rows.numel()), first_row))
    return chunks


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

    def scaled(self, logits: torch.Tensor, owned: bool) -> tuple[torch.Tensor, bool]:
        """Rows of logits [n, V/tp] as fp32 x = logits / temperature with -inf on padded columns, and whether x may
        be written: computed in place when `owned` (a copy, or in the backward), else into a fresh tensor, or x is
        the rows themselves when nothing changes them (then not owned)."""
        x = logits.float()
        owned = owned or x is not logits
        if self.temperature != 1.0:  # x / 1 is x, bit for bit
            x = x.div_(self.temperature) if owned else x / self.temperature
            owned = True
        if self.padded is not None:
            x = x.masked_fill_(self.padded, float("-inf")) if owned else x.masked_fill(self.padded, float("-inf"))
            owned = True
        return x, owned

    @staticmethod
    def rows(flat: torch.Tensor, rows: torch.Tensor, first_row: int | None) -> torch.Tensor:
        """The chunk's rows of the logits [b * s, V/tp]: a view when they are consecutive, else a gathered copy."""
        return flat.index_select(0, rows) if first_row is None else flat[first_row:first_row + rows.numel()]

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
    for the backward: the logits (no copy) and per row max(x), Z, log Z and E_p[z]; p is exp(z) / Z from the logits'
    storage (`keep_exp`), or recomputed as exp(z - log Z) chunk by chunk:
        d log p(label) / d z_j = 1[j = label] - p_j,    d H / d z_j = -p_j (z_j - E_p[z]),    d z / d logits = 1 / T.
    Across tensor parallelism, the forward all-reduces max, Z, z_label and sum exp(z) z; the backward is local."""

    @staticmethod
    def forward(ctx, logits, rows, labels, temperature, with_entropy, entropy_grad, keep_exp, vocab_size, chunks):
        vocab = _VocabSlice(logits.size(-1), temperature, vocab_size, logits.device)
        flat = logits.view(-1, vocab.size)
        shift, sum_exp, log_sum_exp, expected_z = (torch.empty(rows.numel(), device=logits.device) for _ in range(4))
        logp = torch.empty_like(shift)
        for part, first_row in chunks:
            # A view of the logits is written only to keep exp(z) (the no-grad passes leave the logits as they were).
            chunk = vocab.rows(flat, rows[part], first_row)
            x, owned = vocab.scaled(chunk, owned=keep_exp or first_row is None)
            # The shift only stabilises exp(); log-sum-exp is invariant to it.
            shift[part] = vocab.all_reduce(x.max(dim=-1).values, torch.distributed.ReduceOp.MAX)
            z = x.sub_(shift[part].unsqueeze(-1)) if owned else x - shift[part].unsqueeze(-1)
            local, in_slice = vocab.local_labels(labels[part])
            # where, not a product: a clamped index may land on a padded (-inf) column, and -inf * 0 is nan.
            target_z = vocab.all_reduce(torch.where(in_slice, z.gather(-1, local).squeeze(-1), 0.0))
            if with_entropy:
                exp_z = z.exp()
                sum_exp[part] = vocab.all_reduce(exp_z.sum(dim=-1))
                if vocab.padded is not None:  # padded columns contribute 0 (not 0 * -inf)
                    z.masked_fill_(vocab.padded, 0.0)
                # exp(z) z into z when exp(z) is kept (z is not needed after), else into exp(z)
                product = z.mul_(exp_z) if keep_exp else exp_z.mul_(z)
                expected_z[part] = vocab.all_reduce(product.sum(dim=-1)) / sum_exp[part]
                del product
            else:
                exp_z = z.exp_()
                sum_exp[part] = vocab.all_reduce(exp_z.sum(dim=-1))
            log_sum_exp[part] = sum_exp[part].log()
            logp[part] = target_z - log_sum_exp[part]
            if keep_exp and first_row is None:
                flat.index_copy_(0, rows[part], exp_z)
            elif keep_exp and exp_z is not z:  # z is the logits' view
                z.copy_(exp_z)
            del chunk, x, z, exp_z  # before the next chunk's are made: one chunk's buffers at a time
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, rows, labels, shift, sum_exp, log_sum_exp, expected_z)
        ctx.temperature, ctx.vocab_size, ctx.chunks, ctx.keep_exp = temperature, vocab_size, chunks, keep_exp
        entropy = log_sum_exp - expected_z if with_entropy else logp.new_empty(0)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, rows, labels, shift, sum_exp, log_sum_exp, expected_z = ctx.saved_tensors
        vocab = _VocabSlice(logits.size(-1), ctx.temperature, ctx.vocab_size, logits.device)
        flat = logits.view(-1, vocab.size)
        if grad_logp is None:
            grad_logp = torch.zeros_like(shift)
        for part, first_row in ctx.chunks:
            # The gradient is computed in the logits' own rows when they are a view (of fp32 logits), else in a copy.
            chunk = vocab.rows(flat, rows[part], first_row)
            g_logp = grad_logp[part].unsqueeze(-1)
            if ctx.keep_exp:  # -p g_logp = exp(z) (-g_logp / Z); padded columns: exp(-inf) = 0
                grad = chunk.mul_(-g_logp / sum_exp[part].unsqueeze(-1))
            else:
                # z as in the forward, bit for bit: p = exp(z - log Z) is then as exact as the forward's log p.
                z = vocab.scaled(chunk, owned=True)[0].sub_(shift[part].unsqueeze(-1))
                if grad_entropy is None:  # -p g_logp
                    grad = z.sub_(log_sum_exp[part].unsqueeze(-1)).exp_().mul_(-g_logp)
                else:  # -p (g_logp + g_H (z - E_p[z]))
                    p = (z - log_sum_exp[part].unsqueeze(-1)).exp_()
                    grad = z.sub_(expected_z[part].unsqueeze(-1)).mul_(grad_entropy[part].unsqueeze(-1))
                    grad = grad.add_(g_logp).mul_(p).neg_()
                    del p
                    if vocab.padded is not None:  # p = 0 there, times -inf
                        grad.masked_fill_(vocab.padded, 0.0)
                del z
            local, in_slice = vocab.local_labels(labels[part])
            grad.scatter_add_(-1, local, torch.where(in_slice.unsqueeze(-1), g_logp, 0.0))
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            if first_row is None:
                flat.index_copy_(0, rows[part], grad.to(flat.dtype))
            elif grad.data_ptr() != chunk.data_ptr():
                chunk.copy_(grad)
            del chunk, grad
        elsewhere = torch.ones(flat.size(0), dtype=torch.bool, device=flat.device)
        elsewhere[rows] = False
        flat.index_fill_(0, elsewhere.nonzero().squeeze(-1), 0.0)
        return logits, None, None, None, None, None, None, None, None
