"""Adversarial attacks: pure functions on ``logits_fn(x) -> logits``, a batch, a PRNG key and a
:class:`jaxrobust.threat.ThreatModel`. See docs/INTERFACES.md."""
from jaxrobust.attacks import losses
from jaxrobust.attacks.apgd import apgd, apgd_targeted
from jaxrobust.attacks.autoattack import evaluate_robustness
from jaxrobust.attacks.fab import fab
from jaxrobust.attacks.pgd import fgsm, multi_targeted_pgd, pgd
from jaxrobust.attacks.square import square

__all__ = ["losses", "pgd", "fgsm", "multi_targeted_pgd", "apgd", "apgd_targeted", "fab", "square",
           "evaluate_robustness"]
