"""Vocab-parallel distillation over torch.distributed (docs/METHODS.md, "Vocab-parallel
distillation"): each rank holds the columns [vocab_start, vocab_start + V_local) of the student's
and the teacher's logits, or its hidden states and its shard of each lm_head. The loss equals the
unsharded primitive's.

Composition over the backends' shard entry points (kdkernels/_options.py, SHARD_STATS and
SHARD_ROWS): each rank's kernel computes the statistics of its columns, one all-gather of the
packed [rows, 15] float64 tensor (with a header that checks the ranks agree) brings every rank's,
every rank merges them alike (below: the only math here, per row), and each rank's kernel then
writes the gradient of its own columns from the merged values. The backward needs no
collective. A dynamic (DTD) temperature and the divergences other than the forward KL need one
more small collective each (the temperature must be known before the tempered sums; those
divergences need the normalised distributions before their per-class terms).
"""
import math
import zlib

import torch
import torch.distributed as dist

from . import ops
from ._core import (
    _host_scalars,
    check_floating,
    check_options,
    check_padded_width,
    check_tensors,
    empty_result,
    finish,
    fused_options,
    reduce_rows,
    scale_saved,
)
from ._fused_linear import linear
from ._options import (
    FLAG_STILL_WRONG,
    FLAG_TEACHER_CORRECT,
    SHARD_ROWS,
    TEMP_ROWS,
    DynamicTemperature,
    SparseTeacher,
)
from .ops import torch_distill
from .ops.torch_distill import shard_dtd_sums

_INF = math.inf
# the per-row statistics of one shard, in the packed tensor's columns
(_MS, _ZS, _MT, _ZT, _CROSS, _Z1, _SY, _TY, _OWNS, _B, _SB, _TX1, _IDX1, _TX2,
 _SSUM) = range(15)
_FIELDS = 15
# The header each rank sends in the forward's first collective (docs/METHODS.md, "Ranks
# checked"): what must agree across the group, then this rank's shard.
_HEADER = ("row count", "options", "temperature", "temperature checksum", "labels",
           "labels checksum", "vocab_start", "shard width")
_AGREE = 6  # the first _AGREE header fields must be equal on every rank
# Rows that ride in the first collective with the header: its size does not depend on the row
# count, so ranks with different row counts exchange equal sizes and all raise (no abort, no
# hang); rows beyond these go in a second all-gather, once the counts are known to agree.
_FIRST_ROWS = 256
_PRIME = 2147483647  # the label checksums' modulus (2^31 - 1): sums stay exact in float64


def vocab_parallel_distillation_loss(student_logits, teacher_logits=None, target=None, *,
                                     vocab_start, vocab_size, group=None, temperature=4.0,
                                     kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=None,
                                     correction=None, smooth_eps=0.1, virtual_teacher=None,
                                     t2_scale=True, divergence="kl", jsd_beta=0.5,
                                     skew_alpha=0.1, ignore_index=-100, reduction="mean",
                                     return_stats=False, padded_teacher=False):
    r""":func:`distillation_loss` over logits split by vocabulary across the ranks of ``group``.

    Each rank passes its shard: ``student_logits`` and ``teacher_logits`` of shape
    [..., V_local] holding the classes ``[vocab_start, vocab_start + V_local)`` of
    ``vocab_size`` (the shards of the group must tile ``[0, vocab_size)``; sizes may differ),
    and the same ``target`` (global class ids) and per-row ``temperature`` on every rank. Every
    rank gets the same loss; the gradient reaches each rank's own shard of the student. One
    collective per forward (all-gather of 15 numbers per row and rank, a second above 256
    rows), none in the backward; a DTD temperature and the divergences other than ``"kl"`` add
    one small collective each. Ranks that disagree on the rows, labels, temperature or options
    all raise the same ``ValueError`` (docs/METHODS.md, "Ranks checked").

    A :class:`SparseTeacher` is not offered here (its classes would need routing to their
    shards); a virtual teacher is (each rank builds its columns).

    ``padded_teacher=True``: the teacher's vocabulary is the student's plus padding, which lies
    at the end of the last shard (the one that ends at ``vocab_size``): that rank's teacher shard
    may be wider, up to a padded width that is a multiple of 8; its extra columns are dropped.
    Every other rank's teacher shard covers the same classes as its student shard.
    """
    hyper = dict(kd_weight=kd_weight, ce_weight=ce_weight, wrong_kd_weight=wrong_kd_weight,
                 correction=correction, smooth_eps=smooth_eps, virtual_teacher=virtual_teacher,
                 t2_scale=t2_scale, divergence=divergence, jsd_beta=jsd_beta,
                 skew_alpha=skew_alpha, ignore_index=ignore_index)
    check_options(temperature=temperature, reduction=reduction, padded_teacher=padded_teacher,
                  **hyper)
    s = student_logits
    check_floating("student_logits", s)
    lead, width = s.shape[:-1], s.shape[-1]
    _check_shard(vocab_start, vocab_size, width)
    if isinstance(teacher_logits, SparseTeacher):
        raise ValueError("a SparseTeacher is not offered in the vocab-parallel form (its k "
                         "classes would need routing to the ranks that hold them): pass this "
                         "rank's shard of the dense teacher logits")
    full = s.new_empty(()).expand(*lead, vocab_size)  # the primitive's checks, on a stand-in
    teacher_like = None
    if teacher_logits is not None:
        check_floating("teacher_logits", teacher_logits)
        if teacher_logits.dim() == s.dim() and teacher_logits.shape[-1] != width:
            _check_padded_shard("teacher_logits", teacher_logits.shape[-1], width, vocab_start,
                                vocab_size, padded_teacher)
            teacher_logits = teacher_logits[..., :width]
        if teacher_logits.shape != s.shape or teacher_logits.device != s.device:
            raise ValueError(f"teacher_logits shard {tuple(teacher_logits.shape)} on "
                             f"{teacher_logits.device} does not match student_logits shard "
                             f"{tuple(s.shape)} on {s.device}")
        teacher_like = teacher_logits.new_empty(()).expand(*lead, vocab_size)
    temperature = check_tensors(full, teacher_like, target, temperature, **hyper)
    if group is None and not dist.is_initialized():
        raise RuntimeError("vocab-parallel distillation needs torch.distributed initialised "
                           "(dist.init_process_group) or a group")
    rows = _Rows.from_logits(s, teacher_logits, target, temperature, vocab_start, vocab_size,
                             hyper)
    job = _Job(rows, hyper, temperature, vocab_size, group, reduction)
    if rows.N == 0:  # the header only: a rank with rows would wait for this one
        job.check()
        loss, temps, flags = empty_result([s], reduction, rows.acc, s.device)
    elif torch.is_grad_enabled() and s.requires_grad:
        loss, temps, flags = _VocabParallel.apply(s, job)
    else:
        loss, temps, flags = job.prepare()[:3]
    return finish(loss, temps, flags, lead, reduction, return_stats, target is not None)


def vocab_parallel_fused_linear_distillation_loss(
        student_hidden, student_weight, teacher=None, target=None, *, vocab_start, vocab_size,
        group=None, student_bias=None, teacher_weight=None, teacher_bias=None, temperature=4.0,
        kd_weight=0.9, ce_weight=0.1, wrong_kd_weight=None, correction=None, smooth_eps=0.1,
        virtual_teacher=None, t2_scale=True, divergence="kl", jsd_beta=0.5, skew_alpha=0.1,
        ignore_index=-100, reduction="mean", return_stats=False, chunk_size=None,
        memory_budget=None, padded_teacher=False):
    r""":func:`vocab_parallel_distillation_loss` from hidden states and this rank's shard of
    the lm_head (``student_weight`` [V_local, H], the rows ``[vocab_start, vocab_start +
    V_local)`` of the full weight), the logits computed a chunk of rows at a time as in
    :func:`fused_linear_distillation_loss`; the teacher as hidden states with its weight's
    shard, or as its logits' shard. Still one collective per forward: every pass over the
    chunks computes the logits again (the statistics, then the gradient).

    The gradient of ``student_hidden`` is this rank's part: the sum over the ranks is the
    whole (tensor-parallel frameworks all-reduce it where the hidden states enter the
    vocab-parallel lm_head, e.g. Megatron's copy to the tensor-parallel region).

    ``padded_teacher=True``: as for :func:`vocab_parallel_distillation_loss`, the last rank's
    teacher weight shard (or logits shard) may have the padding rows (columns) at its end.
    """
    from ._fused_linear import _check_linear, check_chunking, chunk_rows, teacher_stand_in
    hyper = dict(kd_weight=kd_weight, ce_weight=ce_weight, wrong_kd_weight=wrong_kd_weight,
                 correction=correction, smooth_eps=smooth_eps, virtual_teacher=virtual_teacher,
                 t2_scale=t2_scale, divergence=divergence, jsd_beta=jsd_beta,
                 skew_alpha=skew_alpha, ignore_index=ignore_index)
    check_options(temperature=temperature, reduction=reduction, padded_teacher=padded_teacher,
                  **hyper)
    check_chunking(chunk_size, memory_budget)
    h, W = student_hidden, student_weight
    _check_linear("student", h, W, student_bias)
    lead, width = h.shape[:-1], W.shape[0]
    _check_shard(vocab_start, vocab_size, width)

    def fit_rows(name, rows):
        _check_padded_shard(name, rows, width, vocab_start, vocab_size, padded_teacher)
    teacher_like, teacher_weight, teacher_bias = teacher_stand_in(
        teacher, teacher_weight, teacher_bias, h, lead, width, vocab_size, fit_rows)
    if teacher_like is None and isinstance(teacher, SparseTeacher):
        raise ValueError("a SparseTeacher is not offered in the vocab-parallel form (its k "
                         "classes would need routing to the ranks that hold them)")
    if teacher_like is None and teacher is not None:  # this rank's shard of its logits
        check_floating("teacher", teacher)
        if teacher.dim() == h.dim() and teacher.shape[-1] != width:
            fit_rows("teacher", teacher.shape[-1])
            teacher = teacher[..., :width]
        if teacher.shape != lead + (width,) or teacher.device != h.device:
            raise ValueError(f"teacher logits shard {tuple(teacher.shape)} on {teacher.device} "
                             f"does not match {tuple(lead) + (width,)} on {h.device}")
        teacher_like = teacher.new_empty(()).expand(*lead, vocab_size)
    full = h.new_empty(()).expand(*lead, vocab_size)
    temperature = check_tensors(full, teacher_like, target, temperature, **hyper)
    if group is None and not dist.is_initialized():
        raise RuntimeError("vocab-parallel distillation needs torch.distributed initialised "
                           "(dist.init_process_group) or a group")
    H = h.shape[-1]
    h2 = h.reshape(-1, H)
    N = h2.shape[0]
    teacher_bytes = width * teacher.element_size() if teacher_weight is not None else 0
    runner = ops.resolve("auto", h.device)  # the kernels write a chunk's gradient over its logits
    over = hasattr(runner, "shard_pass") and getattr(runner, "GRAD_OVER_STUDENT", False)
    chunk_size = chunk_rows(N, h, W, teacher_bytes, chunk_size, memory_budget, over)
    t2 = None
    if teacher is not None:
        t2 = teacher.reshape(-1, teacher.shape[-1])
    rows = _LinearRows(h2, W, student_bias, t2, teacher_weight, teacher_bias, target,
                       temperature, vocab_start, vocab_size, virtual_teacher, chunk_size)
    job = _Job(rows, hyper, temperature, vocab_size, group, reduction)
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, W, student_bias))
    if N == 0:
        job.check()
        loss, temps, flags = empty_result([h2, W, student_bias], reduction, rows.acc, h.device)
    elif wants_grad:
        loss, temps, flags = _VocabParallelLinear.apply(h2, W, student_bias, job)
    else:
        loss, temps, flags = job.prepare()[:3]
    return finish(loss, temps, flags, lead, reduction, return_stats, target is not None)


def _check_padded_shard(name, teacher_width, width, vocab_start, vocab_size, padded_teacher):
    """A teacher shard of `teacher_width` columns against this rank's student shard of `width`:
    wider only on the last shard, by padding (docs/METHODS.md, "Mismatched vocabularies")."""
    if teacher_width < width or vocab_start + width != vocab_size:
        if teacher_width > width and padded_teacher:
            raise ValueError(f"{name} shard has {teacher_width} classes, this rank's student "
                             f"shard {width} ([{vocab_start}, {vocab_start + width}) of "
                             f"{vocab_size}): the teacher's padding may lie only at the end of "
                             "the last shard; every other teacher shard covers the student "
                             "shard's classes")
        check_padded_width(f"{name} shard", teacher_width, width, padded_teacher,
                           "this rank's student shard")
        return
    check_padded_width(f"{name} (its last shard ends at {vocab_start + teacher_width})",
                       vocab_start + teacher_width, vocab_size, padded_teacher,
                       "the student (vocab_size)")


def _check_shard(vocab_start, vocab_size, width):
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if width < 1 or vocab_start < 0 or vocab_start + width > vocab_size:
        raise ValueError(f"this rank's shard [{vocab_start}, {vocab_start + width}) is not "
                         f"inside [0, vocab_size={vocab_size}) or is empty")


class _Rows:
    """Where a pass reads its rows: this rank's [N, V_local] logits shards (and the rows'
    labels and given temperatures), in chunks that keep temporaries in cache."""

    temporary = False  # whether student_rows() makes a new tensor each pass (may be overwritten)

    def __init__(self, N, width, like, target, temperature, vocab_start, vocab_size, virtual,
                 chunk):
        self.N, self.width, self.device, self.dtype = N, width, like.device, like.dtype
        self.acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.target = target.reshape(-1).long() if target is not None else None
        self.temp_rows = (temperature.detach().reshape(-1).to(self.acc)
                          if isinstance(temperature, torch.Tensor) else None)
        self.vocab_start, self.vocab_size, self.virtual = vocab_start, vocab_size, virtual
        self.chunk = chunk

    @classmethod
    def from_logits(cls, s, t, target, temperature, vocab_start, vocab_size, hyper):
        width = s.shape[-1]
        s2 = s.reshape(-1, width)
        rows = cls(s2.shape[0], width, s, target, temperature, vocab_start, vocab_size,
                   hyper["virtual_teacher"], max(1, (1 << 18) // width))
        rows.student = s2
        rows.teacher = t.detach().reshape(-1, width) if t is not None else None
        return rows

    def chunks(self):
        return [(i, min(i + self.chunk, self.N)) for i in range(0, self.N, self.chunk)]

    def shard(self, i, j):
        """(student rows, teacher rows or None for a virtual teacher, labels) of rows [i, j)."""
        teacher = None if self.virtual is not None else self.teacher_rows(i, j)
        y = None if self.target is None else self.target[i:j]
        return self.student_rows(i, j), teacher, y

    def student_rows(self, i, j):
        return self.student[i:j].detach()

    def teacher_rows(self, i, j):
        return self.teacher[i:j]


class _LinearRows(_Rows):
    """Rows from hidden states and this rank's shard of each lm_head, a chunk at a time (the
    fused linear path): the logits are computed again by each pass."""

    temporary = True

    def __init__(self, h, W, b, teacher, teacher_weight, teacher_bias, target, temperature,
                 vocab_start, vocab_size, virtual, chunk):
        super().__init__(h.shape[0], W.shape[0], h, target, temperature, vocab_start,
                         vocab_size, virtual, chunk)
        self.h, self.W, self.b = h.detach(), W.detach(), None if b is None else b.detach()
        self.t_weight = None if teacher_weight is None else teacher_weight.detach()
        self.t_bias = None if teacher_bias is None else teacher_bias.detach()
        self.teacher = None if teacher is None else teacher.detach()  # logits, or hidden states

    def student_rows(self, i, j):
        with torch.no_grad():
            return linear(self.h[i:j], self.W, self.b)

    def teacher_rows(self, i, j):
        if self.t_weight is None:
            return self.teacher[i:j]
        with torch.no_grad():
            return linear(self.teacher[i:j], self.t_weight, self.t_bias)


class _Job:
    """One call: the passes over the rows, their collectives, the gradient of this shard."""

    def __init__(self, rows, hyper, temperature, vocab_size, group, reduction):
        _raise_pending()
        self.rows, self.hyper, self.temperature = rows, hyper, temperature
        self.C, self.group, self.reduction = vocab_size, group, reduction
        h = hyper
        self.ce_w = float(h["ce_weight"])
        self.kd_w = float(h["kd_weight"])
        self.wrong_w = float(h["kd_weight"] if h["wrong_kd_weight"] is None
                             else h["wrong_kd_weight"])
        self.eps = float(h["smooth_eps"])
        self.divergence = h["divergence"]
        if self.divergence == "jsd" and h["jsd_beta"] in (0, 1):
            self.divergence = "kl" if h["jsd_beta"] == 0 else "reverse_kl"
        self.param = float(h["jsd_beta"] if h["divergence"] == "jsd" else h["skew_alpha"])
        self.checked, self.agree = False, None
        self.o = fused_options(hyper, (TEMP_ROWS, 0.0, None, None), True, 1.0, False)
        # the shard entry points of the backend that runs here (C++ on CPU tensors, Triton on
        # CUDA ones, the torch backend's elsewhere)
        runner = ops.resolve("auto", rows.device)
        self.backend = runner if hasattr(runner, "shard_pass") else torch_distill
        if self.backend is not torch_distill and type(rows) is _Rows:
            rows.chunk = max(rows.N, 1)  # a kernel keeps no N x V temporaries: one call

    # ---- collectives ----------------------------------------------------------------------

    def _all_gather(self, local):
        world = dist.get_world_size(self.group)
        out = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(out, local, group=self.group)
        return torch.stack(out)

    def _all_reduce(self, local):
        dist.all_reduce(local, group=self.group)
        return local

    def check(self):
        """The header alone (a call without rows)."""
        self._gather_rows(torch.zeros(0, 1, dtype=torch.float64, device=self.rows.device))

    def _gather_rows(self, local):
        """[world, N, f] from every rank's [N, f] float64 rows. The forward's first call also
        exchanges and checks the header (no extra collective below _FIRST_ROWS rows)."""
        if self.checked:
            return self._all_gather(local.contiguous())
        N, f = local.shape
        head = min(N, _FIRST_ROWS)
        packed = local.new_zeros(1 + _FIRST_ROWS, max(_FIELDS, len(_HEADER)))
        packed[0, :len(_HEADER)] = self._header(local.device)
        packed[1:1 + head, :f] = local[:head]
        g = self._all_gather(packed)
        self._check_header(g[:, 0, :len(_HEADER)])
        self.checked = True
        rows = g[:, 1:1 + head, :f]
        if N > _FIRST_ROWS:
            rows = torch.cat([rows, self._all_gather(local[_FIRST_ROWS:].contiguous())], 1)
        return rows

    def _header(self, device):
        rows = self.rows
        def number(v):  # 4 and 4.0 are the same option
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        index = torch.arange(1, rows.N + 1, device=device, dtype=torch.float64)
        temp = number(self.temperature)
        temp_sum, temp_check, temp_kind = (temp, 0.0, "fixed") if isinstance(temp, float) else (
            0.0, 0.0, "rows" if isinstance(temp, torch.Tensor) else temp)
        if rows.temp_rows is not None:  # a checksum of the given per-row temperatures
            temp_sum = rows.temp_rows.double().sum()
            temp_check = (rows.temp_rows.double() * index).sum()
        labels = labels_check = torch.tensor(-1.0, dtype=torch.float64, device=device)
        if rows.target is not None:  # int64 sums modulo a prime below 2^31: exact in float64
            y = rows.target
            labels = y.sum().remainder(_PRIME).double()
            labels_check = (y * torch.arange(1, rows.N + 1, device=device)).remainder(
                _PRIME).sum().remainder(_PRIME).double()
        options = repr((sorted((k, number(v)) for k, v in self.hyper.items()), self.reduction,
                        self.C, str(rows.dtype), rows.teacher is None, type(rows).__name__,
                        temp_kind))
        values = [rows.N, zlib.crc32(options.encode()), temp_sum, temp_check, labels,
                  labels_check, rows.vocab_start, rows.width]
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                            for v in values])

    def _check_header(self, heads):
        """[world, len(_HEADER)]: the same error on every rank where the ranks disagree on
        what must agree, or their shards do not tile the vocabulary. Read on the host where
        that costs no sync (CPU). Elsewhere a disagreement makes every row's loss NaN, and
        (eager) the header is copied to the host behind the collective and read by the next
        call, which raises the error on every rank."""
        if not _host_scalars(heads):
            self.agree = (heads[:, :_AGREE] == heads[:1, :_AGREE]).all() & _tiles(heads, self.C)
            if not torch.compiler.is_compiling():
                _defer_check(heads, self.C)
            return
        message = _disagreement(heads, self.C)
        if message is not None:
            raise ValueError(message)

    # ---- the forward -----------------------------------------------------------------------

    def prepare(self):
        """The passes and their collectives: (loss, temperatures, flags, the rows' combined
        statistics, the count "mean" divides by)."""
        rows = self.rows
        N, acc, dev = rows.N, rows.acc, rows.device
        y = rows.target
        valid = (torch.ones(N, dtype=torch.bool, device=dev) if y is None
                 else y != self.hyper["ignore_index"])
        T = self._temperatures(valid)
        parts = [self.backend.shard_statistics(*rows.shard(i, j), T[i:j], rows.vocab_start,
                                               self.C, self.o) for i, j in rows.chunks()]
        gathered = self._gather_rows(torch.cat(parts))  # [world, N, fields], float64
        c = self._combine(gathered, T, valid)
        if self.divergence != "kl":  # D and sum_j p_j G_j need the normalised distributions
            merged = self._merged(c)
            sums = torch.cat([self.backend.shard_pass(*rows.shard(i, j), merged[i:j],
                                                      rows.vocab_start, self.C, self.o, False)
                              for i, j in rows.chunks()])
            sums = self._all_reduce(sums)
            c["D"], c["g_mean"] = sums[:, 0], sums[:, 1]
        loss_rows, flags = self._loss_rows(c, valid)
        count = None
        if self.reduction == "mean":
            count = valid.sum().clamp(min=1).to(acc) if y is not None else torch.tensor(
                float(N), dtype=acc, device=dev)
        return reduce_rows(loss_rows, self.reduction, count), T, flags, c, count

    def gradient_pass(self, c, sink, upstream=None):
        """sink(i, j, d loss_rows / d logits of rows [i, j), times `upstream` per row if
        given) for every chunk: no collective."""
        rows = self.rows
        merged = self._merged(c, upstream)
        for i, j in rows.chunks():  # the lm_head's chunk logits are temporaries: overwritten
            sink(i, j, self.backend.shard_pass(*rows.shard(i, j), merged[i:j], rows.vocab_start,
                                               self.C, self.o, overwrite=rows.temporary))

    def _merged(self, c, upstream=None):
        """[N, len(SHARD_ROWS)] float64: the merged values the backend's shard_pass reads."""
        zero = torch.zeros_like(c["T"])
        if "valid" not in c:  # the divergences' sums, before the loss: scale unread
            return torch.stack([c.get(name, zero).double() for name in SHARD_ROWS], -1)
        scale = c["valid"].double() if upstream is None else torch.where(
            c["valid"], upstream.double(), 0.0)
        values = dict(c, scale=torch.where(c["bad"], torch.nan, scale))
        return torch.stack([values[name].double() for name in SHARD_ROWS], -1)

    def _temperatures(self, valid):
        rows, acc = self.rows, self.rows.acc
        N, dev = rows.N, rows.device
        temp = self.temperature
        if isinstance(temp, DynamicTemperature):  # its weights first: one small collective
            local = torch.cat([shard_dtd_sums(*rows.shard(i, j)[:2], temp.weighting)
                               for i, j in rows.chunks()])
            if temp.weighting == "cosine":
                ss, tt, st = self._gather_rows(local).sum(0).unbind(1)
                w = (1 - st / (ss.sqrt().clamp(min=1e-12) * tt.sqrt().clamp(min=1e-12))) ** 2
            else:  # max_prob: sum_j exp(s_j - max s), merged over the shards
                g = self._gather_rows(local)
                m = g[..., 0].max(0).values
                w = (g[..., 1] * torch.exp(g[..., 0] - m)).sum(0)
            w = w.to(acc)
            if temp.center:
                mean = torch.where(valid, w, 0.0).sum() / valid.sum().clamp(min=1)
                tau = temp.tau0 + temp.beta * (mean - w)
            else:
                tau = temp.tau0 - temp.beta * w
            return tau.clamp(min=temp.tau_min)
        if rows.temp_rows is not None:
            return rows.temp_rows
        return torch.full((N,), float(temp), dtype=acc, device=dev)

    def _combine(self, g, T, valid):
        """Every rank's statistics into the row's: normalisers, the label's and argmax's
        values, the correction, the KL. float64 scalars per row."""
        T = T.double()
        Ms = g[..., _MS].max(0).values
        Ms_safe = torch.where(Ms == -_INF, 0.0, Ms)
        Zs = (g[..., _ZS] * torch.exp((g[..., _MS] - Ms_safe) / T)).nan_to_num(0.0).sum(0)
        Mt = g[..., _MT].max(0).values
        has_teacher = Mt > -_INF
        Mt_safe = torch.where(has_teacher, Mt, 0.0)
        scale_t = torch.exp((g[..., _MT] - Mt_safe) / T).nan_to_num(0.0)
        Zt = (g[..., _ZT] * scale_t).sum(0)
        cross = (g[..., _CROSS] * scale_t).sum(0) / Zt  # E_q[t - s]
        Z1 = (g[..., _Z1] * torch.exp(g[..., _MS] - Ms_safe).nan_to_num(0.0)).sum(0)
        owns = g[..., _OWNS] > 0
        s_y = (g[..., _SY] * owns).sum(0)
        t_y = (g[..., _TY] * owns).sum(0)
        # the teacher's first argmax: the largest value, the smallest class id among ties
        best = g[..., _MT] == Mt
        b = torch.where(best, g[..., _B], _INF).min(0).values
        winner = best & (g[..., _B] == b)
        s_b = (torch.where(winner, g[..., _SB], 0.0)).sum(0)
        # the largest teacher logit away from the label and the argmax (rectify's still-wrong)
        other = torch.where(g[..., _IDX1] == b, g[..., _TX2], g[..., _TX1]).max(0).values
        log_zs, log_zt = torch.log(Zs), torch.log(Zt)
        lp_y = (s_y - Ms) / T - log_zs
        lp_b = (s_b - Ms) / T - log_zs
        lq_y = (t_y - Mt_safe) / T - log_zt
        lq_b = -log_zt  # t_b is the maximum
        labelled = self.rows.target is not None
        wrong = valid & (t_y < Mt) if labelled else torch.zeros_like(valid)
        kl = cross / T + (Ms - Mt_safe) / T + log_zs - log_zt
        c = dict(T=T, ms=Ms, log_zs=log_zs, mt=Mt_safe, log_zt=log_zt, z1=Z1, s_y=s_y, b=b,
                 has_teacher=has_teacher, wrong=wrong, lp_y=lp_y, lp_b=lp_b, lq_y=lq_y,
                 lq_b=lq_b, fix_y=torch.zeros_like(wrong), fix_b=torch.zeros_like(wrong),
                 lr_y=lq_y, lr_b=lq_b, smoothed=torch.zeros_like(wrong),
                 still_wrong=wrong.clone())
        correction = self.hyper["correction"]
        if labelled and correction in ("swap", "rectify"):
            q_y, q_b = lq_y.exp(), lq_b.exp()
            if correction == "swap":
                lr_y, lr_b = lq_b, lq_y
                kl_fix = q_b * torch.expm1((t_y - Mt_safe) / T) * (s_y - s_b) / T
                c["still_wrong"] = torch.zeros_like(wrong)
            else:
                new_y, new_b = (q_y + 1) / 2, q_b / 2
                k = (q_y + q_b) / (new_y + new_b)
                lr_y, lr_b = torch.log(new_y * k), torch.log(new_b * k)
                kl_fix = (_kl_term(lr_y, lp_y) + _kl_term(lr_b, lp_b) - _kl_term(lq_y, lp_y)
                          - _kl_term(lq_b, lp_b))
                q_other = torch.where(other == -_INF, 0.0, torch.exp((other - Mt_safe) / T) / Zt)
                c["still_wrong"] = wrong & (torch.maximum(lr_b.exp(), q_other) > lr_y.exp())
            kl = torch.where(wrong, kl + kl_fix, kl)
            c.update(fix_y=wrong, fix_b=wrong, lr_y=torch.where(wrong, lr_y, lq_y),
                     lr_b=torch.where(wrong, lr_b, lq_b))
        elif labelled and correction == "smooth":
            s_sum = g[..., _SSUM].sum(0)
            ec = self.eps / self.C
            top = 1 - self.eps + ec
            h = (top * math.log(top) if top > 0 else 0.0) + (
                (self.C - 1) * ec * math.log(ec) if ec > 0 else 0.0)
            sum_lp = (s_sum - self.C * Ms) / T - self.C * log_zs
            kl = torch.where(wrong, h - (1 - self.eps) * lp_y - ec * sum_lp, kl)
            c.update(smoothed=wrong, fix_y=wrong,
                     lr_y=torch.where(wrong, torch.tensor(math.log(top) if top > 0 else -_INF,
                                                         dtype=T.dtype), lq_y))
            c["still_wrong"] = torch.zeros_like(wrong)
        c["D"] = torch.where(has_teacher, kl, 0.0)
        c["g_mean"] = torch.zeros_like(kl)
        return c

    def _loss_rows(self, c, valid):
        T = c["T"]
        w = torch.where(c["wrong"], T.new_tensor(self.wrong_w), T.new_tensor(self.kd_w))
        w = w * c["has_teacher"]
        loss = w * (T * T if self.hyper["t2_scale"] else 1.0) * torch.where(
            c["has_teacher"], c["D"], 0.0)
        if self.ce_w != 0:
            loss = loss + self.ce_w * (torch.log(c["z1"]) + c["ms"] - c["s_y"])
        bad = ~(T > 0)
        if self.agree is not None:  # ranks that disagree, unread on the host: NaN everywhere
            bad = bad | ~self.agree
        loss = torch.where(bad, torch.nan, torch.where(valid, loss, 0.0))
        c["kd_grad"] = w * (T if self.hyper["t2_scale"] else 1 / T)
        c["valid"], c["bad"] = valid, bad
        flags = torch.zeros_like(valid, dtype=torch.int8)
        if self.rows.target is not None:
            flags = (torch.where(valid & ~c["wrong"], FLAG_TEACHER_CORRECT, 0)
                     + torch.where(c["still_wrong"], FLAG_STILL_WRONG, 0)).to(torch.int8)
        return loss.to(self.rows.acc), flags


def _disagreement(heads, C):
    """The error where the ranks' headers ([world, len(_HEADER)], on the host) disagree on what
    must agree, or their shards do not tile [0, C); None where all is well."""
    table = heads.tolist()
    names = [name for k, name in enumerate(_HEADER[:_AGREE])
             if len({row[k] for row in table}) > 1]
    if names:
        return ("the ranks of the vocab-parallel group disagree on " + ", ".join(names)
                + " (every rank must pass the same rows, labels, temperature and options): "
                + "; ".join(f"rank {r}: " + ", ".join(
                    f"{name} {row[_HEADER.index(name)]:.17g}" for name in names)
                    for r, row in enumerate(table)))
    if not bool(_tiles(heads, C)):
        return (f"the ranks' shards do not tile [0, vocab_size={C}): starts "
                f"{heads[:, _HEADER.index('vocab_start')].long().tolist()}, widths "
                f"{heads[:, -1].long().tolist()}")
    return None


def _tiles(heads, C):
    """A bool tensor (no host read): whether the ranks' shards tile [0, C)."""
    starts, widths = heads[:, _HEADER.index("vocab_start")], heads[:, -1]
    order = starts.argsort()
    first, ends = starts[order], (starts + widths)[order]
    return (first[0] == 0) & (first[1:] == ends[:-1]).all() & (ends[-1] == C)


# Headers of calls whose tensors live on a device (docs/METHODS.md, "Ranks checked"): copied to
# the host behind their collective, read when the next call starts, when the copy has long
# finished, so that reading them waits for nothing.
_PENDING = []


def _defer_check(heads, C):
    if heads.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph replays without this Python: its calls go unchecked
        host = torch.empty(heads.shape, dtype=heads.dtype, pin_memory=True)
        host.copy_(heads.contiguous(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host, done = heads.clone(), None
    _PENDING.append((host, done, C))


def _raise_pending():
    """The error of an earlier call's header, on every rank (all read the same headers)."""
    while _PENDING:
        host, done, C = _PENDING.pop(0)
        if done is not None:
            done.synchronize()
        message = _disagreement(host, C)
        if message is not None:
            _PENDING.clear()
            raise ValueError(message + " (found in the previous call, whose loss is NaN: "
                             "with CUDA tensors the header is read at the next call, which "
                             "costs no sync)")


def _mean_scale(count, N):
    """The rows' upstream factor a "mean" folds into the forward's gradient (1 / count), so
    that loss.backward() leaves it as written; None for "sum"."""
    return None if count is None else (1 / count).expand(N)


def _kl_term(log_x, log_p):
    x = log_x.exp()
    return torch.where(x > 0, x * (log_x - log_p), 0.0)


class _VocabParallelLinear(torch.autograd.Function):
    """The fused linear form: "mean" / "sum" write the hidden states', weight's and bias's
    gradients in the forward (the backward scales them); "none" runs the gradient pass again
    in the backward with each row's upstream gradient. No collective in the backward."""

    @staticmethod
    def forward(ctx, h, W, b, job):
        from ._fused_linear import GradientSink
        loss, temps, flags, c, count = job.prepare()
        ctx.job, ctx.need = job, ctx.needs_input_grad[:3]
        if job.reduction == "none":
            ctx.c = c
            ctx.save_for_backward(h, W, b)
        else:
            sink = GradientSink(h, W, b, ctx.need)
            job.gradient_pass(c, sink, _mean_scale(count, job.rows.N))
            ctx.save_for_backward(*sink.results())
        ctx.mark_non_differentiable(temps, flags)
        return loss, temps, flags

    @staticmethod
    def backward(ctx, grad_loss, _t, _f):
        from ._fused_linear import GradientSink
        job = ctx.job
        if job.reduction == "none":
            h, W, b = ctx.saved_tensors
            sink = GradientSink(h, W, b, ctx.need)
            job.gradient_pass(ctx.c, sink, upstream=grad_loss.reshape(-1))
            return (*sink.results(), None)
        gh, gw, gb = ctx.saved_tensors
        return (*scale_saved((gh, gw, gb), grad_loss), None)


class _VocabParallel(torch.autograd.Function):
    """Forward: the passes and their collectives, the shard's gradient written; backward: that
    gradient times the upstream gradient (no collective)."""

    @staticmethod
    def forward(ctx, student, job):
        loss, temps, flags, c, count = job.prepare()
        parts = []  # the chunks' gradients, as the backend wrote them (one chunk: no copy)
        job.gradient_pass(c, lambda i, j, g: parts.append(g), _mean_scale(count, job.rows.N))
        grad = parts[0] if len(parts) == 1 else torch.cat(parts)
        ctx.reduction, ctx.shape = job.reduction, student.shape
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(temps, flags)
        return loss, temps, flags

    @staticmethod
    def backward(ctx, grad_loss, _t, _f):
        (grad,) = ctx.saved_tensors
        (grad,) = scale_saved((grad,), grad_loss, ctx.reduction == "none")
        return grad.reshape(ctx.shape), None
