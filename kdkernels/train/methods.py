"""The methods the driver compares: how each student is taught, through kdkernels' modules."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kdkernels
from kdkernels.reference.methods import METHODS as LOSSES


@dataclass(frozen=True)
class Method:
    name: str
    teacher: Optional[str]  # None, "teacher" (CE-trained), "self" (student arch), "tolerant" (TSD)
    make_loss: Callable  # cfg -> fn(student_logits, teacher_logits, y, epoch)
    description: str
    corrects: bool = False  # changes the teacher's values on the rows where it is wrong


# Each maker returns fn(student_logits, teacher_logits, y, epoch) -> loss or (loss, stats). The
# losses on kdkernels' primitive also take `shard` (loop.VocabShard, --vocab-parallel): the
# logits are then this rank's columns, and the loss is the vocab-parallel one.

def _ce(cfg):
    ce = torch.nn.CrossEntropyLoss()
    return lambda s, t, y, epoch: ce(s, y)


def _label_smoothing(cfg):
    ce = torch.nn.CrossEntropyLoss(label_smoothing=cfg.ls_eps)  # torch's own, per METHODS.md
    return lambda s, t, y, epoch: ce(s, y)


def _distil(loss, before_step=None):
    """fn(s, t, y, epoch, shard=None) for a kdkernels loss module, with statistics."""
    def fn(s, t, y, epoch, shard=None):
        if before_step is not None:
            before_step(epoch)
        if shard is None:
            return loss(s, t, y, return_stats=True)
        return shard.loss(loss, s, t, y)
    fn.shardable = True
    return fn


def _shared(name, **hyper):
    """A loss from the one table of methods (kdkernels.reference.methods), with statistics."""
    return _distil(LOSSES[name].fused(**hyper))


def _kd(cfg):
    return _shared("kd", temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                   ce_weight=cfg.ce_weight)


def _tfkd_reg(cfg):
    return _shared("tfkd_reg", a=cfg.tfkd_a, temperature=cfg.tfkd_temperature,
                   kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight)


def _lessons(correction, weighting=None):
    def make(cfg):
        temperature = cfg.temperature if weighting is None else kdkernels.DynamicTemperature(
            tau0=cfg.tau0, beta=cfg.beta, weighting=weighting)
        return _shared(f"lessons_{correction}", temperature=temperature,
                       smooth_eps=cfg.smooth_eps, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight)
    return make


def _teacher_bias(cfg):
    loss = LOSSES["teacher_bias"].fused(total_epochs=cfg.epochs, gamma=None,
                                        temperature=cfg.temperature)
    return _distil(loss, before_step=loss.set_epoch)  # gamma = epoch / total_epochs


def top_score_difference(cfg):
    loss = kdkernels.TopScoreDifferenceLoss(eta=cfg.tsd_eta, k=cfg.tsd_k)
    return lambda s, t, y, epoch: loss(s, y)


METHODS = {m.name: m for m in [
    Method("ce", None, _ce, "cross-entropy baseline"),
    Method("label_smoothing", None, _label_smoothing, "torch's label smoothing (eps=ls_eps)"),
    Method("kd", "teacher", _kd, "Hinton KD from the CE-trained teacher"),
    Method("tfkd_self", "self", _kd, "Tf-KD self: KD from a trained copy of the student"),
    Method("tfkd_reg", None, _tfkd_reg, "Tf-KD reg: virtual teacher from the labels"),
    Method("lessons_swap", "teacher", _lessons("swap"), "Preparing Lessons: swap, fixed T",
           corrects=True),
    Method("lessons_smooth", "teacher", _lessons("smooth"), "Preparing Lessons: smooth, fixed T",
           corrects=True),
    Method("lessons_swap_cosine", "teacher", _lessons("swap", "cosine"),
           "Preparing Lessons: swap + DTD (cosine)", corrects=True),
    Method("lessons_swap_max_prob", "teacher", _lessons("swap", "max_prob"),
           "Preparing Lessons: swap + DTD (max_prob)", corrects=True),
    Method("teacher_bias", "teacher", _teacher_bias,
           "teacher's bias: rectify + gamma = epoch / total_epochs", corrects=True),
    Method("tsd_kd", "tolerant", _kd,
           "KD from a tolerant teacher trained with Top Score Difference"),
    Method("born_again", "generations", _kd,
           "generations: gen 0 from labels with TSD, gen m by KD from gen m-1"),
]}
