"""torchtune's knowledge-distillation losses on kdkernels' kernels (docs/INTEGRATIONS.md): the
constructors, call signatures and values of ``torchtune.modules.loss.ForwardKLLoss``,
``ReverseKLLoss``, ``SymmetricKLLoss`` and their ``...WithChunkedOutputLoss`` forms (0.6.1).

    from kdkernels.integrations.torchtune import ForwardKLWithChunkedOutputLoss
    kd_loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)  # in place of torchtune's

torchtune's conventions, kept: temperature 1, no T^2; its "forward KL" is the soft
cross-entropy ``-sum_j q_j log p_j = KL(q || p) + H(q)`` (same gradient; the teacher's entropy
H(q) is added here, computed from the teacher's logits without a gradient); rows whose label is
``ignore_index`` are dropped, the others' sum is divided by their number (``normalize=False``:
the sum). Where the student's logits are infinite (``-inf``: a class it masks) and the teacher
gives that class mass, the soft cross-entropy is infinite; torchtune leaves such classes out of
its sum, and so does this forward term on CPU tensors: when the kernels' sum is not finite, it
is computed again in torch by torchtune's formula (value and gradient); on CUDA, where reading
the sum would cost a host sync, it stays infinite. Differences, by design: a batch
whose every row is dropped gives 0 in every class (torchtune's
``ReverseKLWithChunkedOutputLoss`` and ``SymmetricKLWithChunkedOutputLoss`` give NaN there); the
reverse KL is infinite where the teacher masks a class (logit ``-inf``) on which the student has
mass (torchtune leaves such classes out of its sum, which changes the gradient too: not
offered), and finite with a finite gradient where the student masks one (torchtune: the same
value, a NaN gradient); chunk lists whose length differs from ``num_output_chunks`` raise a
ValueError (torchtune's ``zip`` drops the extra ones); the loss is float64 for float64 logits
(torchtune's is float32). Needs only torch.
"""
import torch

from .._core import distillation_loss
from ._common import row_mask_target

ENTROPY_BLOCK = 1 << 24  # elements of the teacher's probabilities held at once for H(q)


def _teacher_entropy_sum(teacher_logits, kept):
    """sum over kept rows of H(softmax(t)), in float32 (float64 for float64), a block of rows at
    a time, without a gradient."""
    t = teacher_logits.detach()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=t.device)
    rows = max(1, ENTROPY_BLOCK // max(t.shape[-1], 1))
    with torch.no_grad():
        for i in range(0, t.shape[0], rows):
            entropy = torch.special.entr(torch.softmax(t[i:i + rows].to(acc), -1)).sum(-1)
            total += entropy.masked_fill(kept[i:i + rows] < 0, 0).sum()
    return total


def _masked_soft_ce_sum(s, t, kept):
    """torchtune's forward KL, summed over kept rows: ``-sum_j q_j log p_j`` over the classes
    whose student logit is finite (in float32, float64 for float64)."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    q = torch.softmax(t.detach().to(acc), -1)
    terms = (q * torch.log_softmax(s.to(acc), -1)).masked_fill(torch.isinf(s), 0)
    return -terms.sum(-1).masked_fill(kept < 0, 0).sum()


def _kd_sum(student_logits, teacher_logits, labels, ignore_index, fkl_ratio):
    """fkl_ratio * (soft cross-entropy) + (1 - fkl_ratio) * (reverse KL), summed over kept rows."""
    V = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    kept = row_mask_target(labels.reshape(-1), ignore_index)
    if kept.shape[0] != s.shape[0]:
        raise ValueError(f"labels have {kept.shape[0]} elements, the logits {s.shape[0]} rows")
    options = dict(temperature=1.0, kd_weight=1.0, ce_weight=0.0, reduction="sum")
    total = 0
    if fkl_ratio > 0:
        soft_ce = distillation_loss(s, t, kept, **options) + _teacher_entropy_sum(t, kept)
        # a student -inf where the teacher has mass (or NaN): read on the host only where that
        # costs no sync (CPU, eager); on CUDA the term stays infinite
        if soft_ce.device.type == "cpu" and not torch.compiler.is_compiling() \
                and not torch.isfinite(soft_ce):
            soft_ce = _masked_soft_ce_sum(s, t, kept)
        total = fkl_ratio * soft_ce
    if fkl_ratio < 1:
        total = total + (1 - fkl_ratio) * distillation_loss(s, t, kept, divergence="reverse_kl",
                                                            **options)
    return total


def _normalized(total, labels, ignore_index):
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)  # 0 when every row is dropped


class _KDLoss(torch.nn.Module):
    fkl_ratio = 1.0

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits, teacher_logits, labels, normalize=True):
        """student_logits, teacher_logits: [rows, V] (or [..., V]); labels: one per row, only
        compared with ``ignore_index``. Returns the mean over kept rows (``normalize=False``:
        the sum)."""
        total = _kd_sum(student_logits, teacher_logits, labels, self.ignore_index,
                        self.fkl_ratio)
        return _normalized(total, labels, self.ignore_index) if normalize else total


class ForwardKLLoss(_KDLoss):
    """torchtune's ForwardKLLoss: the soft cross-entropy ``-sum q log p`` (KL + the teacher's
    entropy), mean over the rows whose label is not ``ignore_index``."""


class ReverseKLLoss(_KDLoss):
    """torchtune's ReverseKLLoss: ``KL(p || q)``, mean over the kept rows."""
    fkl_ratio = 0.0


def _check_ratio(sym_kd_ratio):
    if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
        raise ValueError("sym_kd_ratio must be in the range [0, 1]")


class SymmetricKLLoss(_KDLoss):
    """torchtune's SymmetricKLLoss: ``sym_kd_ratio`` times :class:`ForwardKLLoss` plus
    ``1 - sym_kd_ratio`` times :class:`ReverseKLLoss`; ``sym_kd_ratio`` is read at each call, as
    torchtune's is (a schedule may change it)."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        _check_ratio(sym_kd_ratio)
        super().__init__(ignore_index)
        self.sym_kd_ratio = sym_kd_ratio

    @property
    def fkl_ratio(self):
        return self.sym_kd_ratio


class _ChunkedKDLoss(torch.nn.Module):
    fkl_ratio = 1.0

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def forward(self, student_logits, teacher_logits, labels):
        """student_logits, teacher_logits: lists of ``num_output_chunks`` chunks [B, L_i, V] of
        the logits along the tokens; labels: [B, L]. The mean over kept rows of all chunks."""
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        if not len(student_logits) == len(teacher_logits) == len(label_chunks):
            raise ValueError(f"{len(student_logits)} student and {len(teacher_logits)} teacher "
                             f"chunks for {len(label_chunks)} chunks of the labels "
                             f"(num_output_chunks={self.num_output_chunks})")
        total = 0
        for s, t, y in zip(student_logits, teacher_logits, label_chunks):
            total = total + _kd_sum(s, t, y, self.ignore_index, self.fkl_ratio)
        return _normalized(total, labels, self.ignore_index)


class ForwardKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """torchtune's ForwardKLWithChunkedOutputLoss: :class:`ForwardKLLoss` over chunked logits."""


class ReverseKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """torchtune's ReverseKLWithChunkedOutputLoss: :class:`ReverseKLLoss` over chunked logits."""
    fkl_ratio = 0.0


class SymmetricKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """torchtune's SymmetricKLWithChunkedOutputLoss: :class:`SymmetricKLLoss` over chunked
    logits. Its ratio is the constructor's: torchtune's builds its inner SymmetricKLLoss with
    it, so a later ``sym_kd_ratio`` changes nothing there either."""

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5,
                 ignore_index: int = -100):
        _check_ratio(sym_kd_ratio)
        super().__init__(num_output_chunks, ignore_index)
        self.sym_kd_ratio = self.fkl_ratio = sym_kd_ratio
