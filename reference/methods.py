"""The distillation methods, each once: the fused loss (a kdkernels module built from the
method's hyper-parameters) and the reference loss with the same hyper-parameters. The tests, the
benchmarks and the training driver share this table.

``METHODS[name].fused(backend="auto", **overrides)`` returns ``fn(s, t, y, **kw)`` (the kdkernels
module, called with the teacher and labels it takes; ``kw`` e.g. ``return_stats=True``; the
module's own methods, e.g. ``set_epoch``, stay reachable); ``METHODS[name].reference(**overrides)``
the oracle's ``fn(s, t, y)``; the defaults are ``METHODS[name].defaults``.
"""
from dataclasses import dataclass, field
from typing import Callable

import kdkernels

from . import losses as R


@dataclass(frozen=True)
class Method:
    name: str
    module: Callable  # (**hyper-parameters, backend) -> fn(s, t, y)
    oracle: Callable  # (s, t, y, **hyper-parameters) -> loss
    defaults: dict = field(default_factory=dict)
    uses_teacher: bool = True
    uses_labels: bool = True

    def fused(self, backend="auto", **overrides):
        return self.module(backend=backend, **dict(self.defaults, **overrides))

    def reference(self, **overrides):
        hyper = dict(self.defaults, **overrides)
        return lambda s, t, y: self.oracle(s, t, y, **hyper)


def _dynamic(temperature):
    """The module takes a DynamicTemperature, the oracle its fields as a dict."""
    if isinstance(temperature, kdkernels.DynamicTemperature):
        return dict(tau0=temperature.tau0, beta=temperature.beta, weighting=temperature.weighting,
                    center=temperature.center, tau_min=temperature.tau_min)
    return temperature


class _Call:
    """A module called as fn(s, t, y, **kw) whatever its own arguments; attributes pass through."""

    def __init__(self, module, call):
        self.module, self._call = module, call

    def __call__(self, s, t, y, **kw):
        return self._call(self.module, s, t, y, **kw)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _kd_module(backend, **hyper):
    labelled = hyper.get("ce_weight", 0.1) != 0
    return _Call(kdkernels.KDLoss(backend=backend, **hyper),
                 lambda m, s, t, y, **kw: m(s, t, y if labelled else None, **kw))


def _kd_oracle(s, t, y, ce_weight=0.1, **hyper):
    return R.kd_loss(s, t, y if ce_weight else None, ce_weight=ce_weight, **hyper)


def _tfkd_module(backend, **hyper):
    return _Call(kdkernels.TfKDRegLoss(backend=backend, **hyper),
                 lambda m, s, t, y, **kw: m(s, y, **kw))


def _lessons_module(backend, **hyper):
    return _Call(kdkernels.PreparingLessonsLoss(backend=backend, **hyper),
                 lambda m, s, t, y, **kw: m(s, t, y, **kw))


def _lessons_oracle(s, t, y, temperature=4.0, **hyper):
    return R.preparing_lessons_loss(s, t, y, temperature=_dynamic(temperature), **hyper)


def _bias_module(backend, **hyper):
    return _Call(kdkernels.TeacherBiasLoss(backend=backend, **hyper),
                 lambda m, s, t, y, **kw: m(s, t, y, **kw))


def _bias_oracle(s, t, y, gamma, temperature=4.0):
    return R.teacher_bias_loss(s, t, y, gamma, temperature=temperature)


DTD = kdkernels.DynamicTemperature
METHODS = {m.name: m for m in [
    Method("kd", _kd_module, _kd_oracle, dict(temperature=4.0)),
    Method("kd_no_labels", _kd_module, _kd_oracle, dict(temperature=2.0, ce_weight=0.0),
           uses_labels=False),
    Method("tfkd_reg", _tfkd_module, lambda s, t, y, **h: R.tfkd_reg_loss(s, y, **h),
           dict(a=0.95, temperature=20.0), uses_teacher=False),
    Method("lessons_swap", _lessons_module, _lessons_oracle, dict(correction="swap")),
    Method("lessons_smooth", _lessons_module, _lessons_oracle, dict(correction="smooth")),
    Method("lessons_swap_dtd", _lessons_module, _lessons_oracle,
           dict(correction="swap", temperature=DTD(weighting="cosine"))),
    Method("lessons_smooth_cosine", _lessons_module, _lessons_oracle,
           dict(correction="smooth", temperature=DTD(weighting="cosine"))),
    Method("lessons_swap_max_prob_centred", _lessons_module, _lessons_oracle,
           dict(correction="swap", temperature=DTD(tau0=5.0, beta=0.2, weighting="max_prob",
                                                   center=True))),
    Method("teacher_bias", _bias_module, _bias_oracle, dict(gamma=0.3)),
]}
