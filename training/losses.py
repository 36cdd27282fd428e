"""The AToken reconstruction objective (without the GAN): L1, LPIPS, Gram-matrix style loss on
the LPIPS network's features, and KL of the posterior with a tiny weight."""

from __future__ import annotations

from torch import Tensor



def gram(feat: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, C] normalised by the number of entries."""
    b, c, h, w = feat.shape
    f = feat.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def gram_loss(feats_rec: list[Tensor], feats_target: list[Tensor]) -> Tensor:
    """Mean absolute difference of Gram matrices over the LPIPS network's feature maps."""
    total = 0
    for fr, ft in zip(feats_rec, feats_target):
        total = total + (gram(fr) - gram(ft)).abs().mean()
    return total


def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per token, averaged."""
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """KL(teacher || student) on temperature-softened class distributions, scaled by T^2
    (the paper distils SigLIP2 similarities this way at T=2; here the teacher's ImageNet classes)."""
    t = temperature
    teacher = (teacher_logits / t).log_softmax(-1)
    student = (student_logits / t).log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t
