"""hessjax: Hessian-based generalization measures, bounds and robust fine-tuning in JAX.

Implements Ju, Li & Zhang, "Robust Fine-Tuning of Deep Neural Networks with Hessian-based
Generalization Guarantees", ICML 2022 (arXiv:2206.02659).

``import hessjax`` is cheap and side-effect free: the submodules (and JAX itself) are imported
on first use of one of the public names below (PEP 562 module ``__getattr__``).
"""

import importlib as _importlib

__version__ = "0.1.0"

# Public name -> the submodule that defines it: the core only (Hessians, estimators, measures,
# bounds, the robust fine-tuning pieces, data and models). Training (``hessjax.train``), runs
# (``hessjax.experiment``), devices (``hessjax.sharding``) and the command line
# (``hessjax.cli``) keep their names in their own packages.
_EXPORTS: dict[str, str] = {
    # hessian.py
    "hvp": "hessian",
    "hvp_fn": "hessian",
    "batch_matvec": "hessian",
    "batched_hvp": "hessian",
    "block_hvp": "hessian",
    "block_hvp_fn": "hessian",
    # mapping.py
    "chunked_vmap": "mapping",
    # partition.py
    "Partition": "partition",
    "layer_partition": "partition",
    "path_name": "partition",
    # estimators/
    "Estimate": "estimators",
    "LanczosResult": "estimators",
    "SpectralDensity": "estimators",
    "hutchinson_trace": "estimators",
    "hutchpp_trace": "estimators",
    "lanczos": "estimators",
    "eigenvalues": "estimators",
    "spectral_density": "estimators",
    "quadratic_form": "estimators",
    "positive_part": "estimators",
    "positive_quadratic_form": "estimators",
    "trace_of_function": "estimators",
    "power_iteration": "estimators",
    # measures/
    "HessianDistance": "measures",
    "LayerTraces": "measures",
    "NoiseStability": "measures",
    "Report": "measures",
    "displacement": "measures",
    "distances": "measures",
    "hessian_distance": "measures",
    "layer_traces": "measures",
    "noise_stability": "measures",
    "report": "measures",
    "spectral_norms": "measures",
    # bounds.py
    "Bound": "bounds",
    "corollary_bound": "bounds",
    "generalization_gap": "bounds",
    "hessian_bound": "bounds",
    "log10_spectral_norm_bound_term": "bounds",
    "spectral_norm_bound": "bounds",
    # losses.py
    "backward_corrected_cross_entropy": "losses",
    "forward_corrected_cross_entropy": "losses",
    "generalized_cross_entropy": "losses",
    "symmetric_cross_entropy": "losses",
    "label_smoothing_cross_entropy": "losses",
    "bootstrapped_cross_entropy": "losses",
    # noise.py
    "validate_transition": "noise",
    "validate_labels": "noise",
    "symmetric_transition": "noise",
    "uniform_replacement_transition": "noise",
    "pair_flip_transition": "noise",
    "confusion_counts": "noise",
    "transition_from_counts": "noise",
    "corrupt_labels": "noise",
    "replace_labels": "noise",
    "anchor_transition": "noise",
    "dual_t_transition": "noise",
    # transforms.py
    "project_to_anchor": "transforms",
    "anchor_penalty": "transforms",
    "layerwise_radii": "transforms",
    "ProjectToAnchorState": "transforms",
    "AnchorPenaltyState": "transforms",
    # data.py
    "Splits": "data",
    "load_dataset": "data",
    "load_splits": "data",
    "stratified_split": "data",
    "subsample_per_class": "data",
    "resize_images": "data",
    "imagenet_preprocess": "data",
    "iterate_batches": "data",
    "read_idx": "data",
    # models/
    "MobileNetV2": "models",
    "ResNet": "models",
    "resnet18": "models",
    "resnet50": "models",
    "pretrained_mobilenet_v2": "models",
    "pretrained_resnet": "models",
    "mobilenet_v2_trunk": "models",
    "load_state_dict": "models",
    "save_state_dict": "models",
    "load_torch_weights": "models",
    "to_torch_state_dict": "models",
    "mobilenet_v2_weights_path": "models",
    "BertConfig": "models",
    "BertModel": "models",
    "BertClassifier": "models",
    "pretrained_bert": "models",
    "bert_classifier": "models",
    "bert_tokenizer": "models",
    "minilm_path": "models",
    "ModelSpec": "models",
    "model_spec": "models",
    "make_model": "models",
    "resnet_stage_depth": "models",
    "mobilenet_v2_stage_depth": "models",
    "bert_layer_depth": "models",
    # text.py
    "encode_texts": "text",
}

# Subpackages and modules reachable as ``hessjax.<name>`` (imported on first use).
_SUBMODULES = (
    "hessian",
    "mapping",
    "partition",
    "estimators",
    "measures",
    "bounds",
    "losses",
    "noise",
    "transforms",
    "data",
    "text",
    "models",
    "train",
    "experiment",
    "sharding",
    "cli",
)

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'hessjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES})
