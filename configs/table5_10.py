"""Thesis Table 5.10 (§5.1.4): ImageNet-100, RN34, r = 0.99, every method trained with FGSM + ATTA
(Algorithm 5.2: the per-example perturbation cache stored down-sampled to 32x32 in bfloat16, up-sampled
when read), ``<net>_<method>[,smoke]`` with the methods of ``configs/table5_7.py``.

    python -m experiments.train --config=configs/table5_10.py:rn34_ours --workdir=W \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python -m experiments.reproduce --config=configs/table5_10.py:rn34 --workdir=D

ImageNet-100 (the 100 classes of continuum's list, ``imagenet100``) needs ImageNet prepared for TFDS
(the error message says how). The net is the zoo's non-affine, bias-free ResNet with the ImageNet stem
(7x7/2 conv + 3x3/2 max-pool) at 224x224; ε = 2/255, 100 epochs, SGD lr 0.1 cosine, weight decay
1e-4, batch 256, crop + flip. HYDRA's stages: 10 (pruning) and 50 (fine-tuning) epochs.
"""
from configs import table5_2 as t52
from configs import table5_7 as t57

# Thesis Table 5.10 (AA %, ImageNet-100; FP for the dense / HYDRA rows, binary for ours)
THESIS = {"at": (None, 53.92), "at_lbn": (None, 55.14), "hydra_finetune": (None, 43.18),
          "ours_fast": (None, 33.04), "ours": (None, 33.04)}


def get_config(arg: str = "rn34_ours"):
    head, *opts = [s.strip() for s in str(arg).split(",")]
    bad = [o for o in opts if o != "smoke"]
    net = next((n for n in sorted(t52.NETS, key=len, reverse=True)
                if head == n or head.startswith(n + "_")), None)
    method = head[len(net) + 1:] if net else ""
    if net is None or bad or (method and method not in t57.METHODS):
        raise ValueError(f"table5_10: bad config argument {arg!r}; expected '<net>_<method>[,smoke]' "
                         f"(a run) or '<net>[,smoke]' (the row set) with net in {list(t52.NETS)}, "
                         f"method in {list(t57.METHODS)}.")
    smoke = "smoke" in opts
    if not method:
        return t57.row_set("imagenet100", net, smoke, table="table5_10", attack="fast", thesis=THESIS,
                           title=f"Table 5.10: ImageNet-100 {net}, FGSM + ATTA")
    return t57.build("imagenet100", net, method, smoke=smoke, attack="fast")
