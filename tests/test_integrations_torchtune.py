"""kdkernels.integrations.torchtune against the real torchtune losses: value and gradient, plain
and chunked forms, ignored rows, normalize=False, dtypes, masked (-inf) classes; the
constructors' and calls' signatures; the documented differences."""
import inspect

import pytest
import torch

import kdkernels.integrations.torchtune as ours

tune = pytest.importorskip("torchtune.modules.loss")  # optional install: kdkernels[torchtune]

PLAIN = ["ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss"]
CHUNKED = [f"{name[:-4]}WithChunkedOutputLoss" for name in PLAIN]


def _inputs(B, L, V, seed, dtype=torch.float32, ignored=0.3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < ignored] = -100
    return s, t, labels


def _value_and_grad(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, *args, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach().double(), grad.double()


def _pair(name, **kw):
    return getattr(ours, name)(**kw), getattr(tune, name)(**kw)


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("shape", [(2, 7, 13), (1, 5, 130), (3, 1, 2)])
@pytest.mark.parametrize("normalize", [True, False])
def test_plain_losses_equal_torchtunes(name, shape, normalize):
    kw = {"sym_kd_ratio": 0.3} if name.startswith("Symmetric") else {}
    mine, theirs = _pair(name, ignore_index=-100, **kw)
    s, t, y = _inputs(*shape, seed=sum(shape))
    V = shape[-1]
    # torchtune's documented shapes: [rows, V] logits, labels with one value per row
    got = _value_and_grad(mine, s.reshape(-1, V), t.reshape(-1, V), y, normalize=normalize)
    want = _value_and_grad(theirs, s.reshape(-1, V), t.reshape(-1, V), y, normalize=normalize)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("chunks,L", [(8, 16), (3, 10), (1, 4)])
def test_chunked_losses_equal_torchtunes(name, chunks, L):
    kw = {"sym_kd_ratio": 0.7} if name.startswith("Symmetric") else {}
    mine, theirs = _pair(name, num_output_chunks=chunks, ignore_index=-1, **kw)
    s, t, y = _inputs(2, L, 37, seed=L + chunks)
    y[y == -100] = -1  # a custom ignore_index
    values = []
    for fn in (mine, theirs):
        leaf = s.clone().requires_grad_()
        loss = fn(list(leaf.chunk(chunks, dim=1)), list(t.chunk(chunks, dim=1)), y)
        (grad,) = torch.autograd.grad(loss, leaf)
        values.append((loss.double(), grad.double()))
    torch.testing.assert_close(values[0][0], values[1][0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(values[0][1], values[1][1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    """torchtune upcasts to float32; so do the kernels (float64 stays float64 here)."""
    s, t, y = _inputs(2, 6, 50, seed=5, dtype=dtype)
    for name in PLAIN:
        mine, theirs = _pair(name)
        got, want = mine(s.reshape(-1, 50), t.reshape(-1, 50), y), theirs(
            s.reshape(-1, 50), t.reshape(-1, 50), y)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)


def test_forward_kl_is_the_soft_cross_entropy():
    """torchtune's forward KL is KL + H(teacher): kdkernels' KL plus the teacher's entropy."""
    import kdkernels
    s, t, y = _inputs(1, 6, 20, seed=8, dtype=torch.float64, ignored=0)
    s, t = s[0], t[0]
    q = torch.softmax(t, -1)
    entropy = -(q * q.log()).sum(-1).mean()
    kl = kdkernels.distillation_loss(s, t, temperature=1.0, kd_weight=1.0, ce_weight=0.0)
    got = ours.ForwardKLLoss()(s, t, y[0])
    torch.testing.assert_close(got, kl + entropy, rtol=1e-12, atol=1e-12)
    assert got > kl + 0.5  # the entropy of a 20-class softmax of N(0, 9) logits is well above


def test_all_rows_ignored_give_zero_where_torchtune_gives_nan():
    s, t, y = _inputs(1, 4, 9, seed=3)
    y[:] = -100
    for name in CHUNKED:
        mine, theirs = _pair(name, num_output_chunks=2)
        args = (list(s.chunk(2, dim=1)), list(t.chunk(2, dim=1)), y)
        assert mine(*args).item() == 0.0
        if not name.startswith("Forward"):  # torchtune's own 0/0
            assert torch.isnan(theirs(*args))
    for name in PLAIN:
        assert _pair(name)[0](s[0], t[0], y[0]).item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        ours.SymmetricKLLoss(sym_kd_ratio=1.5)
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        ours.SymmetricKLWithChunkedOutputLoss(sym_kd_ratio=-0.1)
    s, t, y = _inputs(1, 8, 9, seed=4)
    with pytest.raises(ValueError, match="num_output_chunks=4"):
        ours.ForwardKLWithChunkedOutputLoss(num_output_chunks=4)(
            list(s.chunk(2, dim=1)), list(t.chunk(2, dim=1)), y)
    with pytest.raises(ValueError, match="labels have 7 elements"):
        ours.ReverseKLLoss()(s[0], t[0], y[0, :7])


def _signature(fn):
    """(name, kind, default) of each parameter: what a caller of the function depends on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", PLAIN + CHUNKED)
def test_constructor_and_forward_signatures_are_torchtunes(name):
    for method in ("__init__", "forward"):
        mine, theirs = getattr(getattr(ours, name), method), getattr(getattr(tune, name), method)
        assert _signature(mine) == _signature(theirs), (name, method)


def _student_masks_classes(seed):
    """Student logits -inf on some classes (never a whole row) on which the teacher has mass."""
    s, t, y = _inputs(2, 5, 17, seed=seed)
    masked = torch.rand(s.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
    masked[..., 0] = False
    return s.masked_fill(masked, float("-inf")), t, y


@pytest.mark.parametrize("name", ["ForwardKLLoss", "SymmetricKLLoss",
                                  "ForwardKLWithChunkedOutputLoss",
                                  "SymmetricKLWithChunkedOutputLoss"])
def test_student_masked_classes_are_left_out_of_the_forward_kl(name):
    """torchtune drops the classes whose student logit is infinite from its forward KL (the
    kernels' soft cross-entropy is +inf there): the same value; the forward KL's gradient is
    torchtune's, the symmetric one's finite (torchtune's reverse term gives NaN)."""
    s, t, y = _student_masks_classes(seed=11)
    mine, theirs = _pair(name)
    if "Chunked" in name:
        mine, theirs = _pair(name, num_output_chunks=2)

    def call(fn, leaf):
        if "Chunked" in name:
            return fn(list(leaf.chunk(2, dim=1)), list(t.chunk(2, dim=1)), y)
        return fn(leaf.reshape(-1, 17), t.reshape(-1, 17), y)
    got, want = _value_and_grad(lambda x: call(mine, x), s), _value_and_grad(
        lambda x: call(theirs, x), s)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-5)
    if name.startswith("Forward"):
        torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-6)
    else:
        assert torch.isnan(want[1]).any()


def test_teacher_masked_classes_make_the_reverse_kl_infinite():
    """Documented difference: KL(p || q) is +inf where the teacher masks a class the student
    gives mass; torchtune leaves the class out."""
    s, t, y = _inputs(1, 4, 9, seed=12, ignored=0)
    t[..., 3] = float("-inf")
    mine, theirs = _pair("ReverseKLLoss")
    assert mine(s[0], t[0], y[0]) == float("inf")
    assert torch.isfinite(theirs(s[0], t[0], y[0]))


def test_sym_kd_ratio_is_read_when_called_as_torchtunes_is():
    """SymmetricKLLoss reads sym_kd_ratio at each call (a schedule may set it); the chunked form
    keeps the constructor's (torchtune's inner loss holds it), in both libraries."""
    s, t, y = _inputs(2, 6, 13, seed=13)
    mine, theirs = _pair("SymmetricKLLoss")
    before = mine(s.reshape(-1, 13), t.reshape(-1, 13), y)
    for loss in (mine, theirs):
        loss.sym_kd_ratio = 0.9
    got, want = (fn(s.reshape(-1, 13), t.reshape(-1, 13), y) for fn in (mine, theirs))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert (got - before).abs() > 1e-3
    mine, theirs = _pair("SymmetricKLWithChunkedOutputLoss", num_output_chunks=3)
    args = (list(s.chunk(3, dim=1)), list(t.chunk(3, dim=1)), y)
    before = mine(*args)
    for loss in (mine, theirs):
        loss.sym_kd_ratio = 0.9
    got, want = mine(*args), theirs(*args)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, before, rtol=0, atol=0)
