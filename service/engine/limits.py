"""Bounds on what one request may ask the engine to build or compute."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    tensor_elements: int = 4_000_000
    """Elements in any one tensor of a request (inputs, targets, parameter values)."""
    batch_elements: int = 8_000_000
    """Elements of a batch's inputs, all of them together."""
    model_elements: int = 10_000_000
    """Parameters of one model, all tensors together."""
    expression_length: int = 1_000
    """Characters of an expression."""
    expression_depth: int = 32
    """Nesting of an expression's tree (parentheses, calls and operators)."""
    expression_nodes: int = 256
    """Nodes of an expression's tree."""
    layers: int = 64
    """Layers of a sequential model."""
    layer_width: int = 16_384
    """``in_features``/``out_features`` of a linear layer; ``normalized_shape`` elements."""
    activation_elements: int = 16_000_000
    """Elements of any tensor a model computes (outputs and every intermediate value)."""
    explain_elements: int = 1_000_000
    """Elements an explained answer's trace may show: values, dL/dnode and local derivatives."""
    tensor_dims: int = 8
    """Dimensions of any one tensor."""
    request_bytes: int = 2 * 1024**3
    """Estimated peak memory of one request, all of it together (``engine.budget``)."""
    answer_bytes: int = 64 * 1024**2
    """Bytes of one JSON answer."""
    hessian_params: int = 4096
    """Trainable parameters a full ``hessian`` may span (it holds their square)."""


DEFAULT_LIMITS = Limits()
