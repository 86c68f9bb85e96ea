"""kdkernels.integrations.hf on tiny config-built transformers models (random weights, no
download) against the models' own logits path: full logits from model(...), shifted, and the
float64 reference loss; value and every student parameter's gradient; tied embeddings; hidden
states from output_hidden_states; Gemma 2 / 3 final logit soft-caps; scaled logits refused; padded
teacher vocabularies; ignore_index in the default labels; PEFT-style wrappers."""
from types import SimpleNamespace

import pytest
import torch
from helpers import LargestTensor

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


def _compare(student, teacher, ids, mask, labels, options, tol=1e-10, reference_teacher=None,
             **kw):
    """Ours against the models' own path (with ``reference_teacher`` in the teacher's place
    there, if given): the loss and every student parameter's gradient."""
    loss = distill_models_loss(student, teacher, ids, mask, labels, **options, **kw)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    want = _through_full_logits(student, reference_teacher or teacher, ids, mask, labels,
                                options)
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


def tiny_gemma(vocab, hidden, seed, cap, gemma3=False):
    """Gemma 2 (or Gemma 3's text model), tied embeddings, its final logit soft-cap ``cap``:
    small, as the random models' logits are (|logits| < 0.3), so that the tanh bends them."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                 max_position_embeddings=64, final_logit_softcapping=cap)
    if gemma3:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**shape))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape))
    return model.double()


@pytest.mark.parametrize("options", OPTIONS)
def test_soft_capped_gemma_student_and_teacher(options):
    """Each model's own cap (Gemma 2 student 0.15, Gemma 3 teacher 0.2) from its config, against
    the models' .logits (which apply it); several chunk sizes; a plain teacher."""
    student = tiny_gemma(V, 16, seed=0, cap=0.15)
    teacher = tiny_gemma(V, 24, seed=1, cap=0.2, gemma3=True).eval()
    ids, mask, labels = token_batch(3, 9, V, seed=12)
    for chunk_size in (1, 5, None):
        _compare(student, teacher, ids, mask, labels, options, chunk_size=chunk_size)
    _compare(student, tiny_llama(V, 24, seed=2, dtype=torch.float64).eval(), ids, mask, labels,
             options)
    capped = distill_models_loss(student, teacher, ids, mask, labels, **options)
    for model in (student, teacher):  # each cap changes the loss
        cap, model.config.final_logit_softcapping = model.config.final_logit_softcapping, None
        assert (distill_models_loss(student, teacher, ids, mask, labels, **options)
                - capped).abs().max() > 1e-4
        model.config.final_logit_softcapping = cap


def test_soft_caps_come_from_the_configs_only():
    student, teacher = tiny_gemma(V, 16, seed=0, cap=0.15), tiny_llama(V, 16, seed=1)
    ids, mask, labels = token_batch(2, 6, V, seed=7)
    for name in ("logit_softcap", "teacher_logit_softcap"):
        with pytest.raises(ValueError, match=f"{name} is not taken here"):
            distill_models_loss(student.float(), teacher, ids, mask, labels, **{name: 1.0})


def test_scaled_logits_are_refused():
    plain = tiny_llama(V, 16, seed=1)
    ids, mask, labels = token_batch(2, 6, V, seed=7)
    scaled = tiny_llama(V, 16, seed=2)
    scaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="teacher's config sets logit_scale=0.5"):
        distill_models_loss(plain, scaled, ids, mask, labels)
    with pytest.raises(ValueError, match="student's config sets logit_scale=0.5"):
        distill_models_loss(scaled, plain, ids, mask, labels)
    scaled.config.logit_scale = 1.0  # a scale of 1 changes nothing: it runs
    assert torch.isfinite(distill_models_loss(scaled, plain, ids, mask, labels))


def test_default_labels_use_the_given_ignore_index():
    """Without labels, the padding is ignore_index (the shift's pad is too), not -100."""
    student = tiny_llama(V, 16, seed=0, dtype=torch.float64)
    teacher = tiny_llama(V, 24, seed=1, dtype=torch.float64)
    ids, mask, _ = token_batch(2, 7, V, seed=11)  # row 0: its last 2 tokens are padding
    options = dict(OPTIONS[0], reduction="none", ignore_index=-1)
    got = distill_models_loss(student, teacher, ids, mask, None, **options)
    want = distill_models_loss(student, teacher, ids, mask, ids.masked_fill(mask == 0, -1),
                               **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[0, -3:] == 0).all() and (got[1, :-1] != 0).all()  # predicting padding, the last
    default = dict(OPTIONS[0], reduction="none")
    torch.testing.assert_close(got, distill_models_loss(student, teacher, ids, mask, None,
                                                        **default), rtol=0, atol=0)


class PeftLike(torch.nn.Module):
    """What the fused path meets of a ``peft.PeftModel`` (peft is not installed here):
    ``get_base_model()`` gives the transformers model, while ``base_model`` is the tuner,
    whose forward is the whole model's (logits, no ``last_hidden_state``)."""

    def __init__(self, model, prompt_learning=False):
        super().__init__()
        self.tuner = torch.nn.Module()
        self.tuner.model = model
        self.tuner.forward = model.forward
        self.active_peft_config = SimpleNamespace(is_prompt_learning=prompt_learning)

    @property
    def base_model(self):
        return self.tuner

    def get_base_model(self):
        return self.tuner.model


class WrappedHead(torch.nn.Module):  # as PEFT's LoRA layer or modules_to_save wrap a Linear
    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x):
        return self.base_layer(x) * 2


def test_peft_wrapped_models_are_unwrapped():
    student = tiny_llama(V, 16, seed=0, dtype=torch.float64)
    teacher = tiny_llama(V, 24, seed=1, dtype=torch.float64)
    ids, mask, labels = token_batch(2, 8, V, seed=13)
    results = []
    for s_model, t_model in ((PeftLike(student), PeftLike(teacher)), (student, teacher)):
        loss = distill_models_loss(s_model, t_model, ids, mask, labels, **OPTIONS[0])
        results.append((loss, *torch.autograd.grad(loss, list(student.parameters()))))
    for got, want in zip(*results):  # the loss and every parameter's gradient
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(
        lm_head_distillation_loss(PeftLike(student), PeftLike(teacher), out.hidden_states[-1],
                                  t_out.hidden_states[-1], labels, **OPTIONS[1]),
        _through_full_logits(student, teacher, ids, mask, labels, OPTIONS[1]),
        rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="prompt-learning adapter"):
        distill_models_loss(PeftLike(student, prompt_learning=True), teacher, ids, mask, labels)
    student.lm_head = WrappedHead(student.lm_head)
    with pytest.raises(ValueError, match="student's output embeddings are a WrappedHead, not a "
                       "torch.nn.Linear"):
        distill_models_loss(PeftLike(student), teacher, ids, mask, labels)


def test_wider_teacher_vocabulary_needs_padded_teacher():
    student, teacher = tiny_llama(V, 16, seed=0), tiny_llama(V + 31, 16, seed=1)
    ids, mask, labels = token_batch(2, 6, V, seed=8)
    with pytest.raises(ValueError, match="teacher"):
        distill_models_loss(student, teacher, ids, mask, labels)


def test_padded_teacher_vocabulary():
    """A teacher whose lm_head has padding rows (NaN here: they must not be read): the loss and
    the student's gradients equal those with the teacher cut to the student's vocabulary."""
    student = tiny_llama(V, 16, seed=0, dtype=torch.float64)
    teacher = tiny_llama(V + 31, 24, seed=1, dtype=torch.float64)  # 128 rows: padded to 2^7
    ids, mask, labels = token_batch(2, 6, V, seed=9)
    cut = tiny_llama(V, 24, seed=1, dtype=torch.float64)
    cut.load_state_dict({k: (v[:V] if v.shape[0] == V + 31 else v)
                         for k, v in teacher.state_dict().items()})
    with torch.no_grad():
        teacher.lm_head.weight[V:] = float("nan")
    for options in OPTIONS:
        _compare(student, teacher, ids, mask, labels, options, padded_teacher=True,
                 reference_teacher=cut)


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
