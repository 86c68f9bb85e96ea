"""kdkernels.integrations.hf on tiny config-built transformers models (random weights, no
download) against the models' own logits path: full logits from model(...), shifted, and the
float64 reference loss; value and every student parameter's gradient; tied embeddings; hidden
states from output_hidden_states; soft-capped models refused; padded teacher vocabularies."""
import inspect

import pytest
import torch
from helpers import LargestTensor

import kdkernels
import kdkernels.reference as reference
from benchmarks.tiny_lm import tiny_llama, token_batch
from kdkernels.integrations.hf import distill_models_loss, lm_head_distillation_loss

transformers = pytest.importorskip("transformers")  # optional install: kdkernels[hf]

V = 97
OPTIONS = [dict(temperature=2.0, kd_weight=0.7, ce_weight=0.3, divergence="jsd", jsd_beta=0.3),
           dict(temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scale=False),
           dict(temperature=4.0, divergence="reverse_kl", correction="swap", reduction="sum")]


def tiny_qwen(vocab, hidden, seed, tie=True):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    return transformers.Qwen2ForCausalLM(config)


def _through_full_logits(student, teacher, ids, mask, labels, options):
    """The models' own path: full logits, shifted (position i scored against token i + 1), the
    float64 reference loss; its gradients land in the student's parameters."""
    logits = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    if labels is None:
        labels = ids.masked_fill(mask == 0, -100)
    options = dict(options)
    temperature = options.pop("temperature")
    s, t = logits[:, :-1].double(), teacher_logits[:, :-1].double()
    y = labels[:, 1:]
    loss, _ = reference.distillation_loss(s.reshape(-1, V), t.reshape(-1, V), y.reshape(-1),
                                          temperature, **options)
    return loss


def _compare(student, teacher, ids, mask, labels, options, tol=1e-10, **kw):
    loss = distill_models_loss(student, teacher, ids, mask, labels, **options, **kw)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    want = _through_full_logits(student, teacher, ids, mask, labels, options)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol)
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], p.grad, rtol=tol, atol=tol, msg=name)
    student.zero_grad()


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("tie", [False, True])
def test_llama_student_and_wider_teacher(options, tie):
    student = tiny_llama(V, 16, seed=0, tie=tie, dtype=torch.float64)
    teacher = tiny_llama(V, 24, seed=1, layers=2, dtype=torch.float64).eval()
    if tie:
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    ids, mask, labels = token_batch(3, 11, V, seed=2)
    _compare(student, teacher, ids, mask, labels, options)
    _compare(student, teacher, ids, mask, None, options)  # labels from the attention mask


def test_qwen_tied_with_a_chunk_of_rows():
    student, teacher = tiny_qwen(V, 16, 0).double(), tiny_qwen(V, 32, 1, tie=False).double()
    ids, mask, labels = token_batch(2, 9, V, seed=3)
    _compare(student, teacher, ids, mask, labels, OPTIONS[0], chunk_size=5)


def test_reduction_none_gives_one_value_per_position():
    student = tiny_llama(V, 16, seed=0, dtype=torch.float64)
    teacher = tiny_llama(V, 16, seed=1, dtype=torch.float64)
    ids, mask, labels = token_batch(2, 7, V, seed=4)
    rows = distill_models_loss(student, teacher, ids, mask, labels, reduction="none")
    assert rows.shape == (2, 7)
    assert (rows[:, -1] == 0).all() and (rows[:, :2] == 0).all()  # last position, the prompt
    total = distill_models_loss(student, teacher, ids, mask, labels, reduction="sum")
    torch.testing.assert_close(rows.sum(), total)


def test_hidden_states_from_model_outputs():
    student = tiny_llama(V, 16, seed=0, dtype=torch.float64)
    teacher = tiny_llama(V, 24, seed=1, dtype=torch.float64)
    ids, mask, labels = token_batch(2, 8, V, seed=5)
    out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    loss = lm_head_distillation_loss(student, teacher, out.hidden_states[-1],
                                     t_out.hidden_states[-1], labels, **OPTIONS[1])
    torch.testing.assert_close(loss, _through_full_logits(student, teacher, ids, mask, labels,
                                                          OPTIONS[1]), rtol=1e-10, atol=1e-10)


def test_float32_call_never_holds_the_full_logits():
    wide = 256  # a vocabulary larger than the models' activations [tokens, 48]
    student, teacher = tiny_llama(wide, 16, seed=0), tiny_llama(wide, 24, seed=1)
    ids, mask, labels = token_batch(4, 16, wide, seed=6)
    with LargestTensor() as probe:
        loss = distill_models_loss(student, teacher, ids, mask, labels, chunk_size=8)
        loss.backward()
    assert probe.numel <= wide * 24 < ids.numel() * wide / 2  # the teacher's lm_head, at most
    with LargestTensor() as probe:
        student(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert probe.numel >= ids.numel() * wide  # what the models' own path holds


def test_soft_capped_and_scaled_logits_are_refused():
    torch.manual_seed(0)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0))
    plain = tiny_llama(V, 16, seed=1)
    ids, mask, labels = token_batch(2, 6, V, seed=7)
    with pytest.raises(ValueError, match="student's config sets final_logit_softcapping=30.0"):
        distill_models_loss(gemma, plain, ids, mask, labels)
    with pytest.raises(ValueError, match="teacher's config sets final_logit_softcapping"):
        distill_models_loss(plain, gemma, ids, mask, labels)
    gemma.config.final_logit_softcapping = None  # the user's explicit choice: then it runs
    assert torch.isfinite(distill_models_loss(gemma, plain, ids, mask, labels))
    scaled = tiny_llama(V, 16, seed=2)
    scaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        distill_models_loss(plain, scaled, ids, mask, labels)


PADDED = "padded_teacher" in inspect.signature(kdkernels.fused_linear_distillation_loss).parameters


def test_wider_teacher_vocabulary_needs_padded_teacher():
    student, teacher = tiny_llama(V, 16, seed=0), tiny_llama(V + 31, 16, seed=1)
    ids, mask, labels = token_batch(2, 6, V, seed=8)
    with pytest.raises(ValueError, match="teacher"):
        distill_models_loss(student, teacher, ids, mask, labels)


@pytest.mark.skipif(not PADDED, reason="the library's padded_teacher keyword (branch "
                    "vocab-padding) is not merged into this tree yet")
def test_padded_teacher_vocabulary():
    """A teacher whose lm_head has padding rows: its columns past the student's are dropped."""
    student = tiny_llama(V, 16, seed=0, dtype=torch.float64)
    teacher = tiny_llama(V + 31, 24, seed=1, dtype=torch.float64)  # 128 rows: padded to 2^7
    ids, mask, labels = token_batch(2, 6, V, seed=9)
    loss = distill_models_loss(student, teacher, ids, mask, labels, padded_teacher=True,
                               **OPTIONS[0])
    with torch.no_grad():
        teacher.lm_head.weight[V:] = float("nan")  # the padding must not be read
    cut = tiny_llama(V, 24, seed=1, dtype=torch.float64)
    cut.load_state_dict({k: (v[:V] if v.shape[0] == V + 31 else v)
                         for k, v in teacher.state_dict().items()})
    want = _through_full_logits(student, cut, ids, mask, labels, OPTIONS[0])
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """16-bit models: the chunks' logits are the lm_head's matmul in the models' dtype, as their
    own logits are; the loss against the float64 reference on those logits."""
    student, teacher = tiny_llama(V, 16, seed=0, dtype=dtype), tiny_llama(V, 24, seed=1,
                                                                         dtype=dtype)
    ids, mask, labels = token_batch(2, 9, V, seed=10)
    loss = distill_models_loss(student, teacher, ids, mask, labels, **OPTIONS[0])
    assert loss.dtype == torch.float32
    loss.backward()
    grad = student.model.embed_tokens.weight.grad.double()
    student.zero_grad()
    want = _through_full_logits(student, teacher, ids, mask, labels, OPTIONS[0])
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-3)
    want_grad = student.model.embed_tokens.weight.grad.double()
    torch.testing.assert_close(grad, want_grad, rtol=5e-2, atol=5e-2 * want_grad.abs().max())
