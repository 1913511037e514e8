"""Adversarial attacks: pure functions on ``logits_fn(x) -> logits``, a batch, a PRNG key and a
:class:`jaxrobust.threat.ThreatModel`. See docs/INTERFACES.md."""
from jaxrobust.attacks import losses
from jaxrobust.attacks.pgd import fgsm, multi_targeted_pgd, pgd

__all__ = ["losses", "pgd", "fgsm", "multi_targeted_pgd"]
