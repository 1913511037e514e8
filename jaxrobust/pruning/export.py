"""The compact artifact of a pruned (binary) sub-network, its loader and its FLOP counts (Table 5.1).

``export_subnet(model, variables, input_shape, out_dir)`` writes ``out_dir/subnet.npz`` (compressed)
and ``out_dir/manifest.json``:

- per prunable layer i: ``L<i>.mask`` = the bit-packed mask (``np.packbits`` of the kernel's flat
  C-order, n_i bits) and either ``L<i>.signs`` (bit-packed signs of the m_i kept weights) plus a float32
  ``scale`` in the manifest when every kept weight is ±scale (binary and Signed-Kaiming-Constant
  initialisations: 1 + m_i/n_i bits per weight), or ``L<i>.values`` (the m_i kept float32 values:
  HYDRA's fine-tuned weights);
- the other parameters that are not all zero (``P:<path>``: e.g. affine BatchNorm scales; the zero
  biases are only listed in the manifest) and every BatchNorm statistic (``S:<path>``), the last BN's
  included, in float32.

The manifest records the base model (zoo name, kwargs, classes), the layers (shape, kept count,
binary, scale), the artifact's size in bytes against the dense fp32 network (4 bytes per parameter and
BatchNorm statistic of the unpruned model) and the FLOP counts of Table 5.1.

``load_artifact(out_dir)`` rebuilds the zoo model and the masked kernels (W ⊙ m, float32) and returns
an eval-mode ``logits_fn`` whose logits equal the masked model's exactly (the same zoo ``apply`` on the
same kernels). ``export_run`` is the training loop's finish hook (``train.finish_hooks``) that writes
``RUN/export/`` at the end of a pruning run; ``load_export_run(RUN)`` is what
``experiments.evaluate --config.source=export`` attacks (AutoAttack on the artifact).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrobust.pruning.masks import hard_mask
from jaxrobust.pruning.subnet import (SubNet, get_path, last_bn_normalize, path_name,
                                      prunable_layers)

FORMAT = "jaxrobust-subnet-v1"
PAYLOAD = "subnet.npz"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- helpers
def _flat(tree, path=()):
    for k, v in tree.items():
        if hasattr(v, "items"):
            yield from _flat(v, path + (str(k),))
        else:
            yield path + (str(k),), v


def _set(tree: Dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _split(name: str):
    return tuple(name.split("/"))


# ----------------------------------------------------------------------------- FLOPs (Table 5.1)
def table5_1_flops(model: SubNet, input_shape, counts: Optional[List[int]] = None) -> Dict[str, Any]:
    """FLOPs per example of Table 5.1, summed over the network.

    Each prunable layer i with n_i weights, m_i kept and P_i output positions (H·W of a conv's output,
    1 for a dense layer) costs, per example: forward 2·m_i·P_i (full precision: multiply-add) or
    m_i·P_i (binary: add/subtract); backward 4·m_i·P_i + n_i (full precision, the last term the weight
    gradient) or 3·m_i·P_i (binary). Each BatchNorm(+ReLU) on E output elements costs 11·E (training
    forward), 4·E (evaluation) and 4·E (backward). ``dense_fp`` is the unpruned full-precision net
    (m_i = n_i); ``binary_saving`` = 1 − binary / full precision of the sparse net, in training
    (forward + backward), in the training-mode forward pass and in inference (the thesis quotes
    "≈45% and 32%" in training and inference for its RN34; with these formulas our cifar_resnet34 at
    r = 0.99, γ = 0.1 gives 36% / 45% (forward) / 48%).
    """
    input_shape = tuple(input_shape)
    shapes = model.base_shapes(input_shape)
    layers, planned = model.layer_plan(input_shape)
    counts = planned if counts is None else list(counts)
    x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)

    def run(variables, x):
        return model.base.apply(variables, x, train=False, capture_intermediates=True,
                                mutable=["intermediates"])
    logits, inter = jax.eval_shape(run, shapes, x)
    inter = inter["intermediates"]
    per_layer = []
    for (path, shape), m in zip(layers, counts):
        out = get_path(inter, path[:-1])["__call__"][0].shape
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        per_layer.append({"layer": path_name(path), "size": int(np.prod(shape)), "kept": int(m),
                          "positions": positions})
    bn_elements = 0
    for path, leaf in _flat(shapes.get("batch_stats", {})):
        if path[-1] == "mean":
            out = get_path(inter, path[:-1])["__call__"][0].shape
            bn_elements += int(np.prod(out[1:]))
    if model.last_bn:
        bn_elements += int(logits.shape[-1])

    def totals(full: bool, binary: bool):
        mp = sum((l["size"] if full else l["kept"]) * l["positions"] for l in per_layer)
        n = sum(l["size"] for l in per_layer)
        fwd = (1 if binary else 2) * mp
        bwd = 3 * mp if binary else 4 * mp + n
        return {"forward_train": fwd + 11 * bn_elements, "forward_eval": fwd + 4 * bn_elements,
                "backward": bwd + 4 * bn_elements}

    sparse_fp, sparse_bin = totals(False, False), totals(False, True)
    train = lambda t: t["forward_train"] + t["backward"]
    return {"dense_fp": totals(True, False), "sparse_fp": sparse_fp, "sparse_binary": sparse_bin,
            "binary_saving": {"training": 1.0 - train(sparse_bin) / train(sparse_fp),
                              "forward_train": 1.0 - sparse_bin["forward_train"] / sparse_fp["forward_train"],
                              "inference": 1.0 - sparse_bin["forward_eval"] / sparse_fp["forward_eval"]},
            "bn_elements": bn_elements, "layers": per_layer}


# ----------------------------------------------------------------------------- export
def dense_fp32_bytes(model: SubNet, input_shape) -> int:
    """Bytes of the unpruned model in float32: 4 per parameter and per BatchNorm statistic."""
    shapes = model.base_shapes(tuple(input_shape))
    n = sum(int(np.prod(v.shape)) for _, v in _flat(shapes["params"]))
    n += sum(int(np.prod(v.shape)) for _, v in _flat(shapes.get("batch_stats", {})))
    if model.last_bn:
        out = jax.eval_shape(lambda v, x: model.base.apply(v, x, train=False), shapes,
                             jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
        n += 2 * int(out.shape[-1])
    return 4 * n


def export_subnet(model: SubNet, variables, input_shape, out_dir: str, *,
                  extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Writes the artifact of a trained :class:`SubNet` (see the module docstring); returns the
    manifest. ``variables``: the SubNet's ``{'params': {'weights', 'scores'}, 'batch_stats': ...}``."""
    if not isinstance(model, SubNet):
        raise ValueError(f"export_subnet needs a SubNet (model 'subnet'), got {type(model).__name__}.")
    if not model.base_spec:
        raise ValueError("this SubNet has no base_spec: build it with create_subnet / "
                         "create_model('subnet', ...) so the artifact can rebuild its base model.")
    input_shape = tuple(int(d) for d in input_shape)
    variables = jax.device_get(variables)
    weights, scores = variables["params"]["weights"], variables["params"]["scores"]
    layers, counts = model.layer_plan(input_shape)
    arrays: Dict[str, np.ndarray] = {}
    layer_meta = []
    prunable = set()
    masks = jax.jit(lambda s: [hard_mask(get_path(s, p), k) for (p, _), k in zip(layers, counts)])(scores)
    for i, ((path, shape), k) in enumerate(zip(layers, counts)):
        prunable.add(path)
        w = np.asarray(get_path(weights, path), np.float32)
        mask = np.asarray(masks[i])
        kept = w[mask]
        arrays[f"L{i}.mask"] = np.packbits(mask.reshape(-1))
        mags = np.abs(kept)
        binary = bool(kept.size > 0 and np.all(mags == mags[0]) and mags[0] > 0)
        meta = {"path": path_name(path), "shape": list(shape), "size": int(w.size), "kept": int(k),
                "binary": binary}
        if binary:
            arrays[f"L{i}.signs"] = np.packbits(kept > 0)
            meta["scale"] = float(mags[0])
        else:
            arrays[f"L{i}.values"] = kept.astype(np.float32)
        layer_meta.append(meta)
    zeros, params = [], []
    for path, v in _flat(weights):
        if path in prunable:
            continue
        v = np.asarray(v, np.float32)
        if not np.any(v):
            zeros.append({"path": path_name(path), "shape": list(v.shape)})
        else:
            arrays[f"P:{path_name(path)}"] = v
            params.append(path_name(path))
    stats = []
    for path, v in _flat(variables.get("batch_stats", {})):
        arrays[f"S:{path_name(path)}"] = np.asarray(v, np.float32)
        stats.append(path_name(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, PAYLOAD + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, os.path.join(out_dir, PAYLOAD))
    payload = os.path.getsize(os.path.join(out_dir, PAYLOAD))
    manifest = {"format": FORMAT, "base": json.loads(model.base_spec), "input_shape": list(input_shape),
                "last_bn": bool(model.last_bn), "keep_rate": model.keep_rate, "gamma": model.gamma,
                "layers": layer_meta, "zero_params": zeros, "params": params, "stats": stats,
                "kept_weights": int(sum(counts)), "prunable_weights": int(sum(l["size"] for l in layer_meta)),
                "flops": table5_1_flops(model, input_shape, counts), **(extra or {})}
    dense = dense_fp32_bytes(model, input_shape)
    manifest["bytes"] = {"payload": payload, "dense_fp32": dense}
    # the manifest counts its own size: the recorded size only grows until the text fits, and the
    # text is padded with spaces (ignored by JSON) to exactly that size
    b = manifest["bytes"]
    b.update(manifest=0, total=0, dense_over_total=0.0)
    for _ in range(20):
        text = json.dumps(manifest, indent=1, sort_keys=True)
        size = len(text.encode())
        if size <= b["manifest"]:
            break
        b.update(manifest=size, total=payload + size, dense_over_total=round(dense / (payload + size), 2))
    text = text + " " * (manifest["bytes"]["manifest"] - len(text.encode()))
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    return manifest


# ----------------------------------------------------------------------------- loading
class Artifact:
    """A loaded artifact: ``base`` (the zoo model), ``variables`` (its masked kernels, parameters and
    statistics), ``last_bn`` statistics, ``manifest``; ``logits_fn(x)`` (jitted, eval mode)."""

    def __init__(self, base, variables, last_bn, manifest):
        self.base, self.variables, self.last_bn, self.manifest = base, variables, last_bn, manifest
        self.logits_fn = jax.jit(self.apply)

    def apply(self, x):
        """Logits (B, K) of the binary sub-network, float32."""
        y = self.base.apply(self.variables, x, train=False).astype(jnp.float32)
        if self.last_bn is not None:
            y = last_bn_normalize(y, self.last_bn["mean"], self.last_bn["var"])
        return y


def load_artifact(out_dir: str) -> Artifact:
    """Reads ``out_dir/manifest.json`` + ``subnet.npz`` (see the module docstring)."""
    from jaxrobust.models import create_model

    mpath = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"{mpath} not found: export the run first (train.finish_hooks = "
                                f"('jaxrobust.pruning.export:export_run',) or export_subnet).")
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unknown artifact format {manifest.get('format')!r} (expected {FORMAT}).")
    b = manifest["base"]
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in b["kwargs"].items()}
    base = create_model(b["name"], b["num_classes"], **kwargs)
    with np.load(os.path.join(out_dir, PAYLOAD)) as z:
        arrays = {k: z[k] for k in z.files}
    params: Dict[str, Any] = {}
    for i, meta in enumerate(manifest["layers"]):
        n = int(meta["size"])
        mask = np.unpackbits(arrays[f"L{i}.mask"], count=n).astype(bool)
        if int(mask.sum()) != int(meta["kept"]):
            raise ValueError(f"{out_dir}: layer {meta['path']} has {int(mask.sum())} kept weights, the "
                             f"manifest says {meta['kept']}: the artifact is corrupt.")
        w = np.zeros((n,), np.float32)
        if meta["binary"]:
            signs = np.unpackbits(arrays[f"L{i}.signs"], count=int(meta["kept"])).astype(bool)
            scale = np.float32(meta["scale"])
            w[mask] = np.where(signs, scale, -scale)
        else:
            w[mask] = arrays[f"L{i}.values"]
        _set(params, _split(meta["path"]), jnp.asarray(w.reshape(meta["shape"])))
    for z in manifest["zero_params"]:
        _set(params, _split(z["path"]), jnp.zeros(z["shape"], jnp.float32))
    for name in manifest["params"]:
        _set(params, _split(name), jnp.asarray(arrays[f"P:{name}"]))
    stats: Dict[str, Any] = {}
    for name in manifest["stats"]:
        _set(stats, _split(name), jnp.asarray(arrays[f"S:{name}"]))
    variables = {"params": params}
    if "base_stats" in stats:
        variables["batch_stats"] = stats["base_stats"]
    last_bn = stats.get("last_bn") if manifest["last_bn"] else None
    return Artifact(base, variables, last_bn, manifest)


# ----------------------------------------------------------------------------- runs
def export_run(config, workdir: str, variables, setup, step: int = -1) -> Dict[str, Any]:
    """``train.finish_hooks`` entry: writes ``workdir/export/`` for a 'subnet' run (``step``: the
    final step, recorded in the manifest) and returns the sizes (bytes, ratio) and kept weights."""
    if not isinstance(setup.model, SubNet):
        raise ValueError(f"jaxrobust.pruning.export:export_run needs model.name='subnet', got "
                         f"{config.model.name!r}: remove it from train.finish_hooks for dense runs.")
    m = export_subnet(setup.model, variables, setup.dataset.info.image_shape,
                      os.path.join(workdir, "export"), extra={"step": int(step)})
    from jaxrobust.pruning.plots import plot_kernel_mask, plot_layer_keep
    plot_layer_keep(m["flops"]["layers"], os.path.join(workdir, "plots", "subnet_layers.png"))
    layers, counts = setup.model.layer_plan(setup.dataset.info.image_shape)
    convs = [i for i, (_, shape) in enumerate(layers) if len(shape) == 4]
    if convs:  # the largest convolution's mask pattern
        i = max(convs, key=lambda j: int(np.prod(layers[j][1])))
        mask = np.asarray(hard_mask(get_path(jax.device_get(variables)["params"]["scores"], layers[i][0]),
                                    counts[i]))
        plot_kernel_mask(mask, os.path.join(workdir, "plots", "subnet_mask.png"),
                         title=f"{path_name(layers[i][0])}: {counts[i]} of {mask.size} kept")
    return {"bytes": m["bytes"], "kept_weights": m["kept_weights"],
            "prunable_weights": m["prunable_weights"]}


def load_export_run(workdir: str):
    """A :class:`jaxrobust.train.TrainedRun` whose ``logits_fn`` is the artifact in ``workdir/export``
    (what ``experiments.evaluate --config.source=export`` attacks)."""
    from jaxrobust.train import TrainedRun, build_dataset, build_threat, load_config

    config = load_config(workdir)
    art = load_artifact(os.path.join(workdir, "export"))
    ds = build_dataset(config)
    return TrainedRun(config, art.base, art.variables, art.logits_fn, ds,
                      int(art.manifest.get("step", -1)), None,
                      build_threat(config, ds.info))


__all__ = ["export_subnet", "load_artifact", "Artifact", "table5_1_flops", "dense_fp32_bytes",
           "export_run", "load_export_run", "FORMAT"]
