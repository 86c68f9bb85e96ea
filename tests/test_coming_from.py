"""The table of docs/INTEGRATIONS.md ("Coming from another library"), row by row and claim by
claim: each library's loss and the kdkernels call the table gives for it return the same number
(and gradient). With the real packages: TRL, Liger-Kernel (its Triton kernels under the
interpreter on a CPU), torchtune, ModelOpt (nvidia-modelopt, its Megatron plugin with
megatron-core). DistiLLM and DistillKit are no pip package: their formulas are restated from
their source in plain torch, float64 (file and function cited), as is ModelOpt's ghost-token
TopLogitsKLLoss, newer than the 0.47 tested."""
import os

import pytest
import torch
import torch.nn.functional as F

import kdkernels

# the table's common settings: KD term alone, no CE term
KD_ONLY = dict(kd_weight=1.0, ce_weight=0.0)


def _inputs(N=12, V=29, seed=0, dtype=torch.float64, ignored=(1, 6)):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignored)] = -100
    return s, t, labels


def _same(theirs, ours, s, rtol=1e-10, atol=1e-12):
    """Equal values and equal gradients wrt the student's logits (or hidden states)."""
    (g_theirs,) = torch.autograd.grad(theirs, s)
    (g_ours,) = torch.autograd.grad(ours, s)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(g_ours.double(), g_theirs.double(), rtol=rtol, atol=atol)


def _entropy(t, labels):
    """The teacher's entropy, mean over kept rows (soft cross-entropy = KL + this)."""
    q = torch.softmax(t, -1)
    kept = labels != -100
    return torch.special.entr(q).sum(-1)[kept].sum() / kept.sum()


# --- TRL ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_trl_generalized_jsd(beta):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")  # optional install: kdkernels[trl]
    s, t, labels = _inputs()
    T = 2.0
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=T)
    ours = kdkernels.distillation_loss(s, t, labels, divergence="jsd", jsd_beta=beta,
                                       temperature=T, t2_scale=False, **KD_ONLY)
    _same(theirs, ours, s)
    # without labels TRL's "batchmean" divides by the batch dimension: [B, L, V] -> B
    s3, t3 = s.detach().reshape(3, 4, -1).requires_grad_(), t.reshape(3, 4, -1)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s3, t3, None, beta=beta, temperature=T)
    ours = kdkernels.distillation_loss(s3, t3, divergence="jsd", jsd_beta=beta, temperature=T,
                                       t2_scale=False, reduction="sum", **KD_ONLY) / 3
    _same(theirs, ours, s3)
    # with num_items_in_batch=K: the sum divided by K, whatever the reduction
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=T,
                                                 num_items_in_batch=7)
    ours = kdkernels.distillation_loss(s, t, labels, divergence="jsd", jsd_beta=beta,
                                       temperature=T, t2_scale=False, reduction="sum",
                                       **KD_ONLY) / 7
    _same(theirs, ours, s)


# --- Liger-Kernel (its Triton kernels under TRITON_INTERPRET=1 on a CPU) -------------------------

@pytest.mark.skipif(torch.cuda.is_available() is False and os.environ.get("TRITON_INTERPRET")
                    != "1", reason="Liger's Triton kernels need CUDA or the interpreter")
def test_liger_fused_linear_jsd():
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd")
    g = torch.Generator().manual_seed(1)
    N, H, V = 8, 16, 40
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g) * 0.5
    h_t, W_t = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 5]] = -100
    theirs = liger.LigerFusedLinearJSD(jsd_beta=0.3, temperature=2.0)(h, W, h_t, W_t, labels)
    ours = kdkernels.fused_linear_distillation_loss(
        h, W, h_t, labels, teacher_weight=W_t, divergence="jsd", jsd_beta=0.3, temperature=2.0,
        t2_scale=False, **KD_ONLY)
    _same(theirs, ours, h, rtol=2e-5, atol=2e-6)  # Liger computes in float32


@pytest.mark.skipif(torch.cuda.is_available() is False and os.environ.get("TRITON_INTERPRET")
                    != "1", reason="Liger's Triton kernels need CUDA or the interpreter")
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_liger_jsd_on_log_probs(beta):
    """LigerJSD(beta)(log_q, log_p, y) on the student's and the teacher's log-probabilities:
    the JSD at T = 1 of those (a log-softmax is its own logits), mean over kept tokens."""
    liger = pytest.importorskip("liger_kernel.transformers.jsd")
    s, t, labels = _inputs(seed=10, dtype=torch.float32)
    log_q = torch.log_softmax(s, -1)
    theirs = liger.LigerJSD(beta=beta)(log_q, torch.log_softmax(t, -1), labels)
    ours = kdkernels.distillation_loss(s, t, labels, divergence="jsd", jsd_beta=beta,
                                       temperature=1.0, t2_scale=False, **KD_ONLY)
    _same(theirs, ours, s, rtol=2e-5, atol=2e-6)


# --- torchtune ---------------------------------------------------------------------------------

def test_torchtune_forward_kl_is_a_soft_cross_entropy():
    tune = pytest.importorskip("torchtune.modules.loss")  # optional install: kdkernels[torchtune]
    s, t, labels = _inputs(dtype=torch.float32)
    theirs = tune.ForwardKLLoss()(s, t, labels)
    ours = kdkernels.distillation_loss(s, t, labels, temperature=1.0, **KD_ONLY)
    _same(theirs, ours + _entropy(t.double(), labels), s, rtol=1e-5, atol=1e-6)


def test_torchtune_reverse_and_symmetric_kl():
    """ReverseKLLoss: divergence="reverse_kl"; SymmetricKLLoss(r): r (forward + H) + (1 - r)
    reverse."""
    tune = pytest.importorskip("torchtune.modules.loss")
    s, t, labels = _inputs(seed=11, dtype=torch.float32)
    kw = dict(temperature=1.0, **KD_ONLY)

    def reverse():
        return kdkernels.distillation_loss(s, t, labels, divergence="reverse_kl", **kw)
    _same(tune.ReverseKLLoss()(s, t, labels), reverse(), s, rtol=1e-5, atol=1e-6)
    r = 0.3
    forward = kdkernels.distillation_loss(s, t, labels, **kw) + _entropy(t.double(), labels)
    _same(tune.SymmetricKLLoss(sym_kd_ratio=r)(s, t, labels), r * forward + (1 - r) * reverse(),
          s, rtol=1e-5, atol=1e-6)


# --- DistiLLM (jongwooko/distillm, distillm/losses.py: no pip package) ---------------------------
# Restated in float64 from its functions forward_kl, reverse_kl, js_distance, tv_distance,
# skewed_forward_kl and skewed_reverse_kl: temperature 1, no T^2, per-token sums averaged over
# the tokens whose label is not -100. Their forward and skewed forward KLs are cross-entropies
# (-sum q log m): KL plus the teacher's entropy.

def _distillm(kind, s, t, labels, lam):
    p, q = torch.softmax(s, -1), torch.softmax(t, -1)
    log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if kind == "forward_kl":
        x = (q * log_p).sum(-1)
    elif kind == "reverse_kl":
        x = (p * log_q - p * log_p).sum(-1)
    elif kind == "js_distance":
        log_m = torch.log((1 - lam) * q + lam * p)
        x = lam * (p * log_m - p * log_p).sum(-1) + (1 - lam) * (q * log_m - q * log_q).sum(-1)
    elif kind == "tv_distance":
        x = -0.5 * (q - p).abs().sum(-1)
    elif kind == "skewed_forward_kl":
        x = (q * torch.log(lam * q + (1 - lam) * p)).sum(-1)
    else:  # skewed_reverse_kl
        x = (p * torch.log((1 - lam) * q + lam * p) - p * log_p).sum(-1)
    mask = (labels != -100).double()
    return -(x * mask).sum() / mask.sum()


DISTILLM = {  # DistiLLM's loss -> (kdkernels options, + the teacher's entropy)
    "forward_kl": (dict(divergence="kl"), True),
    "reverse_kl": (dict(divergence="reverse_kl"), False),
    "js_distance": (dict(divergence="jsd", jsd_beta=1 - 0.9), False),  # jsd_beta = 1 - lam
    "tv_distance": (dict(divergence="tv"), False),
    "skewed_forward_kl": (dict(divergence="skew_kl", skew_alpha=0.1), True),
    "skewed_reverse_kl": (dict(divergence="skew_reverse_kl", skew_alpha=0.1), False),
}


@pytest.mark.parametrize("kind", list(DISTILLM))
def test_distillm(kind):
    s, t, labels = _inputs(seed=2)
    lam = 0.9 if kind == "js_distance" else 0.1
    options, plus_entropy = DISTILLM[kind]
    theirs = _distillm(kind, s, t, labels, lam)
    ours = kdkernels.distillation_loss(s, t, labels, temperature=1.0, **options, **KD_ONLY)
    if plus_entropy:
        ours = ours + _entropy(t, labels)
    _same(theirs, ours, s)


def test_distillm_symmetric_kl():
    """symmetric_kl(lam) = (1 - lam) forward_kl + lam reverse_kl."""
    s, t, labels = _inputs(seed=3)
    lam = 0.9
    theirs = (1 - lam) * _distillm("forward_kl", s, t, labels, lam) + lam * _distillm(
        "reverse_kl", s, t, labels, lam)
    kw = dict(temperature=1.0, **KD_ONLY)
    ours = (1 - lam) * (kdkernels.distillation_loss(s, t, labels, **kw) + _entropy(t, labels)) \
        + lam * kdkernels.distillation_loss(s, t, labels, divergence="reverse_kl", **kw)
    _same(theirs, ours, s)


# --- DistillKit (arcee-ai/DistillKit: no pip package) --------------------------------------------

def test_distillkit_dense_kl():
    """distillkit/lossfuncs/kl.py, dense_kl_div and KLDLoss.__call__: the per-token KL at T summed
    over the mask, times T^2, divided by the mask's count (num_items_in_batch)."""
    s, t, labels = _inputs(seed=4)
    T = 2.0
    mask = (labels != -100).double()
    kl = F.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), reduction="none",
                  log_target=True).sum(-1)
    theirs = (kl * mask).sum() * T ** 2 / mask.sum()
    ours = kdkernels.distillation_loss(s, t, labels, temperature=T, **KD_ONLY)  # T^2 by default
    _same(theirs, ours, s)


def test_distillkit_distil_logits_script():
    """distil_logits.py, LogitsTrainer.distillation_loss: kl_div(batchmean) over [B, L, V] logits
    (divides by B), times T^2, divided by max_length (= L, the sequences are padded to it):
    the mean over all B * L positions, padding included, no mask."""
    s, t, _ = _inputs(seed=5)
    s3, t3 = s.detach().reshape(3, 4, -1).requires_grad_(), t.reshape(3, 4, -1)
    T, max_length = 2.0, 4
    theirs = F.kl_div(F.log_softmax(s3 / T, -1), F.softmax(t3 / T, -1),
                      reduction="batchmean") * T ** 2 / max_length
    ours = kdkernels.distillation_loss(s3, t3, temperature=T, **KD_ONLY)
    _same(theirs, ours, s3)


# --- ModelOpt (nvidia-modelopt; its Megatron plugin needs megatron-core) ------------------------

def test_modelopt_logits_distillation_loss():
    """modelopt.torch.distill.losses.LogitsDistillationLoss(temperature, reduction="mean"):
    kl_div's "mean" divides by rows * V elements, then times T^2."""
    losses = pytest.importorskip("modelopt.torch.distill.losses")
    s, t, _ = _inputs(seed=6)
    T = 3.0
    theirs = losses.LogitsDistillationLoss(temperature=T)(s, t)
    ours = kdkernels.distillation_loss(s, t, temperature=T, **KD_ONLY) / s.shape[-1]
    _same(theirs, ours, s)
    theirs = losses.LogitsDistillationLoss(temperature=T, reduction="batchmean")(s, t)
    _same(theirs, kdkernels.distillation_loss(s, t, temperature=T, **KD_ONLY), s)


def test_modelopt_logits_distillation_loss_on_3d_logits():
    """[B, L, V] logits: "mean" is still the mean over the B L rows divided by V, but
    "batchmean" divides the sum by B (kl_div's first dimension), not by the B L rows; "none"
    gives one value per row."""
    losses = pytest.importorskip("modelopt.torch.distill.losses")
    s, t, _ = _inputs(seed=12)
    s3, t3 = s.detach().reshape(3, 4, -1).requires_grad_(), t.reshape(3, 4, -1)
    T, V, B = 3.0, s.shape[-1], 3
    kw = dict(temperature=T, **KD_ONLY)
    theirs = losses.LogitsDistillationLoss(temperature=T)(s3, t3)
    _same(theirs, kdkernels.distillation_loss(s3, t3, **kw) / V, s3)
    theirs = losses.LogitsDistillationLoss(temperature=T, reduction="batchmean")(s3, t3)
    _same(theirs, kdkernels.distillation_loss(s3, t3, reduction="sum", **kw) / B, s3)
    assert not torch.allclose(theirs, kdkernels.distillation_loss(s3, t3, **kw))  # not 2-D's
    theirs = losses.LogitsDistillationLoss(temperature=T, reduction="none")(s3, t3)
    ours = kdkernels.distillation_loss(s3, t3, reduction="none", **kw)
    assert theirs.shape == ours.shape == (3, 4)
    _same(theirs.sum(), ours.sum(), s3)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


def _megatron_plugin():
    plugin = pytest.importorskip("modelopt.torch.distill.plugins.megatron")
    from types import SimpleNamespace  # what the losses read of megatron's TransformerConfig
    return plugin, SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)


def _masked_mean(per_token, labels):  # Megatron's loss mask over the [b, s] values
    mask = (labels != -100).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("reverse", [False, True])
def test_modelopt_megatron_logits_kl(reverse):
    """plugins/megatron.py, LogitsKLLoss(temperature, reverse): per-token KL at T (float32), no
    T^2, [b, s] values from [s, b, V] logits, which Megatron's loss mask then averages."""
    plugin, config = _megatron_plugin()
    s, t, labels = _inputs(seed=7)
    T = 2.0
    s3, t3 = s.detach().reshape(4, 3, -1).requires_grad_(), t.reshape(4, 3, -1)  # [s, b, V]
    y3 = labels.reshape(4, 3)
    per_token, _, _ = plugin.LogitsKLLoss(config, temperature=T, reverse=reverse)(s3, t3)
    theirs = _masked_mean(per_token, y3.t())
    ours = kdkernels.distillation_loss(s3, t3, y3, temperature=T, t2_scale=False,
                                       divergence="reverse_kl" if reverse else "kl", **KD_ONLY)
    _same(theirs, ours, s3, rtol=1e-5, atol=1e-6)


def test_modelopt_megatron_top_k_logits_kl():
    """plugins/megatron.py, TopKLogitsKLLoss(top_k): both distributions renormalised over the
    teacher's top-k: the primitive on the gathered top-k columns."""
    plugin, config = _megatron_plugin()
    s, t, labels = _inputs(seed=8)
    T, k = 2.0, 5
    s3, t3 = s.detach().reshape(4, 3, -1).requires_grad_(), t.reshape(4, 3, -1)
    y3 = labels.reshape(4, 3)
    per_token, _, _ = plugin.TopKLogitsKLLoss(config, temperature=T, top_k=k)(s3, t3)
    theirs = _masked_mean(per_token, y3.t())
    idx = t3.topk(k, -1).indices
    rows = torch.where(y3 == -100, -100, 0)  # the labels only mask rows here
    ours = kdkernels.distillation_loss(s3.gather(-1, idx), t3.gather(-1, idx), rows,
                                       temperature=T, t2_scale=False, **KD_ONLY)
    _same(theirs, ours, s3, rtol=1e-5, atol=1e-6)


def test_modelopt_megatron_top_k_with_ghost_token_at_t1():
    """Model-Optimizer's newer TopLogitsKLLoss (plugins/megatron.py on GitHub, after 0.47; restated
    here): KL over the teacher's top-k plus a "ghost" bucket holding the rest of both
    full-vocabulary distributions: at T = 1, a SparseTeacher with a tail."""
    s, t, labels = _inputs(seed=8)
    k = 5
    log_q, log_p = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    top_q, idx = log_q.topk(k, -1)
    top_p = log_p.gather(-1, idx)
    ghost_q = torch.log(-torch.expm1(torch.logsumexp(top_q, -1, keepdim=True)))
    ghost_p = torch.log(-torch.expm1(torch.logsumexp(top_p, -1, keepdim=True)))
    q_all, p_all = torch.cat([top_q, ghost_q], -1), torch.cat([top_p, ghost_p], -1)
    per_token = F.kl_div(p_all, q_all, reduction="none", log_target=True).sum(-1)
    theirs = _masked_mean(per_token, labels)
    teacher = kdkernels.SparseTeacher(idx, top_q, tail=True)
    ours = kdkernels.distillation_loss(s, teacher, labels, temperature=1.0, **KD_ONLY)
    _same(theirs, ours, s, rtol=1e-9, atol=1e-11)


def test_top_k_log_probs_served_at_t_as_scaled_logits():
    """docs/INTEGRATIONS.md, conventions: top-k log-probs already at T, passed as T * logprobs
    without a tail, give the teacher's distribution at T renormalised over its k classes."""
    s, t, labels = _inputs(seed=9)
    T, k = 2.0, 6
    served, idx = torch.log_softmax(t / T, -1).topk(k, -1)  # what a server sampling at T sends
    teacher_k = torch.softmax(served, -1)  # renormalised over the k classes
    log_p = torch.log_softmax(s / T, -1).gather(-1, idx)
    per_token = (teacher_k * (teacher_k.log() - log_p)).sum(-1)
    theirs = per_token[labels != -100].mean()
    ours = kdkernels.distillation_loss(s, kdkernels.SparseTeacher(idx, T * served), labels,
                                       temperature=T, t2_scale=False, **KD_ONLY)
    _same(theirs, ours, s)
