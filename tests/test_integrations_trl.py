"""kdkernels.integrations.trl against the real TRL: generalized_jsd_loss's signature, value and
gradient equal TRL's own (shapes, betas, temperatures, labels with -100, every reduction, its
unreduced per-class terms included, num_items_in_batch, dtypes); the GKD trainer's fused
compute_loss equal to TRL's compute_loss, one training step of each from the same tiny
config-built models, and no [tokens, V] tensor in ours."""
import inspect
import os

import pytest
import torch
from helpers import LargestTensor
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.tiny_lm import tiny_llama, token_batch, word_tokenizer
from kdkernels.integrations.trl import generalized_jsd_loss, gkd_trainer_class

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd")  # optional install: kdkernels[trl]
datasets = pytest.importorskip("datasets")
trl_jsd = gkd.GKDTrainer.generalized_jsd_loss


def _value_and_grad(fn, s, t, labels, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, labels, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach().double(), grad.double()


def _logits(shape, seed, dtype=torch.float64, ignored=0.3, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < ignored] = -100
    if all_ignored:
        labels[:] = -100
    return s, t, labels


@given(B=st.integers(1, 3), L=st.integers(1, 6), V=st.integers(2, 70),
       beta=st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0.01, 0.99),
       temperature=st.sampled_from([1.0, 0.5, 3.0]),
       reduction=st.sampled_from(["batchmean", "sum", "mean"]), with_labels=st.booleans(),
       items=st.sampled_from([None, 7, "tensor"]), seed=st.integers(0, 2 ** 16))
def test_generalized_jsd_equals_trls(B, L, V, beta, temperature, reduction, with_labels, items,
                                     seed):
    s, t, labels = _logits((B, L, V), seed)
    labels = labels if with_labels else None
    if items == "tensor":
        items = torch.tensor(5.0)
    kw = dict(beta=beta, temperature=temperature, reduction=reduction, num_items_in_batch=items)
    got = _value_and_grad(generalized_jsd_loss, s, t, labels, **kw)
    want = _value_and_grad(trl_jsd, s, t, labels, **kw)
    if torch.isnan(want[0]):  # TRL's "mean" over no rows; ours is 0 (documented)
        assert reduction == "mean" and items is None and (labels == -100).all()
        assert got[0] == 0 and not got[1].any()
        return
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 33), (2, 3, 4, 17)])  # [rows, V] and more leading dims
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_other_shapes_and_float32(shape, reduction):
    s, t, labels = _logits(shape, 3, dtype=torch.float32)
    for lab in (labels, None):
        got = _value_and_grad(generalized_jsd_loss, s, t, lab, beta=0.2, temperature=2.0,
                              reduction=reduction)
        want = _value_and_grad(trl_jsd, s, t, lab, beta=0.2, temperature=2.0,
                               reduction=reduction)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_accumulated_in_float32(dtype):
    """TRL computes in the logits' dtype; the kernels in float32: closer to the float64 value."""
    s, t, labels = _logits((2, 5, 40), 4, dtype=dtype)
    ours = generalized_jsd_loss(s, t, labels, beta=0.4)
    exact = trl_jsd(s.double(), t.double(), labels, beta=0.4)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)


def test_labels_are_a_mask_and_all_ignored_rows_give_zero():
    s, t, labels = _logits((2, 4, 9), 5)
    odd = labels.masked_fill(labels == 3, 10 ** 6)  # out of [0, V): TRL keeps the row, so do we
    torch.testing.assert_close(generalized_jsd_loss(s, t, odd), trl_jsd(s, t, odd))
    s, t, labels = _logits((2, 4, 9), 6, all_ignored=True)
    for reduction in ("batchmean", "sum"):
        assert generalized_jsd_loss(s, t, labels, reduction=reduction).item() == 0.0
        assert trl_jsd(s, t, labels, reduction=reduction).item() == 0.0
    assert generalized_jsd_loss(s, t, labels, reduction="mean").item() == 0.0  # TRL: NaN


@pytest.mark.parametrize("reduction", ["none", "avg", None])
@pytest.mark.parametrize("beta", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unreduced_terms_equal_trls(reduction, beta, with_labels, dtype):
    """Any reduction but TRL's three: its per-class terms, [kept rows, V] with labels (the
    -100 rows dropped), the logits' shape without, in their dtype; same student gradient."""
    s, t, labels = _logits((2, 5, 11), 9, dtype=dtype)
    labels = labels if with_labels else None
    kw = dict(beta=beta, temperature=2.0, reduction=reduction)
    got, want = (fn(s.detach().requires_grad_(), t, labels, **kw)
                 for fn in (generalized_jsd_loss, trl_jsd))
    kept = int((labels != -100).sum()) if with_labels else None
    assert got.shape == want.shape == ((kept, 11) if with_labels else (2, 5, 11))
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype)
    leaves = [s.detach().requires_grad_() for _ in range(2)]
    grads = [torch.autograd.grad((fn(leaf, t, labels, **kw) * upstream).sum(), leaf)[0]
             for fn, leaf in zip((generalized_jsd_loss, trl_jsd), leaves)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_unreduced_terms_with_num_items_are_trls_sum():
    """num_items_in_batch wins over any reduction, "none" included: the sum divided by it."""
    s, t, labels = _logits((2, 4, 9), 10)
    for reduction in ("none", "avg"):
        got = _value_and_grad(generalized_jsd_loss, s, t, labels, reduction=reduction,
                              num_items_in_batch=3)
        want = _value_and_grad(trl_jsd, s, t, labels, reduction=reduction,
                               num_items_in_batch=3)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_signature_is_trls():
    def signature(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    assert signature(generalized_jsd_loss) == signature(trl_jsd)


def test_bad_values_are_refused():
    s, t, labels = _logits((2, 3, 5), 7)
    for reduction in ("batchmean", "none"):
        with pytest.raises(ValueError, match="jsd_beta"):
            generalized_jsd_loss(s, t, labels, beta=1.5, reduction=reduction)
        with pytest.raises(ValueError, match="temperature"):
            generalized_jsd_loss(s, t, labels, temperature=0.0, reduction=reduction)


# The GKD trainer: tiny Llama student and (wider) teacher, a word-level tokenizer, labels that
# drop a prompt and padding. lmbda=0: the batches are the data set's (no generation).
V, H_STUDENT, H_TEACHER = 128, 16, 24


def _trainer(out, cls, dtype=torch.float32, beta=0.3, fused_options=None):
    ids, mask, labels = token_batch(4, 10, V, seed=0)
    rows = [dict(input_ids=i.tolist(), attention_mask=m.tolist(), labels=y.tolist())
            for i, m, y in zip(ids, mask, labels)]

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch])
                for k in ("input_ids", "attention_mask", "labels")}

    args = gkd.GKDConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=1,
                         lmbda=0.0, beta=beta, seq_kd=False, report_to=[], save_strategy="no",
                         logging_steps=1, use_cpu=True, optim="sgd", learning_rate=1.0,
                         disable_dropout=True, max_length=None, disable_tqdm=True)
    trainer = cls(model=tiny_llama(V, H_STUDENT, seed=0, dtype=dtype),
                  teacher_model=tiny_llama(V, H_TEACHER, seed=1, dtype=dtype), args=args,
                  train_dataset=datasets.Dataset.from_list(rows),
                  processing_class=word_tokenizer(V), data_collator=collate)
    if fused_options is not None:
        trainer.fused_options = fused_options
    return trainer, collate(rows)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("items", [None, 23])
def test_gkd_compute_loss_equals_trls(beta, items, tmp_path):
    ours, batch = _trainer(tmp_path, gkd_trainer_class(), torch.float64, beta, {"chunk_size": 7})
    theirs, _ = _trainer(tmp_path, gkd.GKDTrainer, torch.float64, beta)
    losses, grads = [], []
    for trainer in (ours, theirs):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in trainer.model.parameters()])
    assert losses[1] > 1e-3  # random models disagree: a loss worth comparing
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-13)
    for g_ours, g_trl in zip(*grads):
        torch.testing.assert_close(g_ours, g_trl, rtol=1e-8, atol=1e-12)


def test_one_gkd_training_step_equals_trls_without_full_logits(tmp_path):
    """float32 steps of both trainers, and TRL's in float64 as the exact one: ours moves the
    parameters as the exact step does (TRL's float32 mixture form loses digits on a small JSD:
    its gradients here are 0.6% off the float64 ones, ours 1e-5)."""
    ours, batch = _trainer(tmp_path, gkd_trainer_class(), fused_options={"chunk_size": 8})
    theirs, _ = _trainer(tmp_path, gkd.GKDTrainer)
    exact, _ = _trainer(tmp_path, gkd.GKDTrainer, torch.float64)
    largest = {}
    for name, trainer in (("ours", ours), ("trl", theirs), ("exact", exact)):
        with LargestTensor() as probe:
            trainer.train()
        largest[name] = probe.numel
    start = tiny_llama(V, H_STUDENT, seed=0).parameters()
    for p_ours, p_exact, p_0 in zip(ours.model.parameters(), exact.model.parameters(), start):
        moved = (p_exact - p_0.double()).abs().max().item()
        assert moved > 0  # the step moved it (SGD, lr 1)
        rounding = 2e-7 * p_0.abs().max().item()  # of the float32 parameters
        torch.testing.assert_close((p_ours - p_0).double(), p_exact - p_0.double(), rtol=0,
                                   atol=1e-3 * moved + rounding)
    assert ours.state.log_history[0]["loss"] == pytest.approx(
        exact.state.log_history[0]["loss"], rel=1e-4)  # float32 logits against float64
    tokens = batch["input_ids"].numel()
    # TRL holds [B, L, V] logits; ours nothing larger than the teacher's lm_head weight [V, 24]
    # (views of it), less than one [B, L - 1, V] tensor (the chunks are [8, V])
    B = batch["input_ids"].shape[0]
    assert largest["trl"] >= tokens * V
    assert largest["ours"] <= V * H_TEACHER < (tokens - B) * V


def test_gkd_evaluate_equals_trls(tmp_path):
    """Trainer.evaluate goes through compute_loss(return_outputs=True): same eval_loss."""
    results = []
    for cls, options in ((gkd_trainer_class(), {"chunk_size": 5}), (gkd.GKDTrainer, None)):
        trainer, _ = _trainer(tmp_path, cls, torch.float64, 0.5, options)
        results.append(trainer.evaluate(eval_dataset=trainer.train_dataset)["eval_loss"])
    assert results[0] == pytest.approx(results[1], rel=1e-10)


def test_sliced_logits_as_trls_compute_loss_passes_them():
    """GKDTrainer.compute_loss passes logits[:, :-1, :] (a strided view) and labels[:, 1:]."""
    s, t, labels = _logits((3, 7, 19), 8)
    s_view, t_view, y_view = s[:, :-1, :], t[:, :-1, :], labels[:, 1:]
    assert not s_view.is_contiguous()
    got = _value_and_grad(generalized_jsd_loss, s_view, t_view, y_view, beta=0.7)
    want = _value_and_grad(trl_jsd, s_view, t_view, y_view, beta=0.7)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
