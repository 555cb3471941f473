"""The fused ReZero ops.  Each checks its inputs, picks a backend (``dispatch``) and runs it.

All of them differentiate with respect to every tensor argument.  ``alpha`` is the ReZero gate:
a 1-element tensor (the paper's scalar) or a vector of the last dimension's size (a per-channel
gate, as LayerScale uses).  Inputs of different floating dtypes are promoted as eager PyTorch
would; the result has the promoted dtype.  Dropout uses the backend's own counter-based
generator seeded from torch's generator, so ``torch.manual_seed`` reproduces a run (the mask of
one backend is not the mask of another).  ``training=False`` or ``dropout_p=0`` is exactly the
no-dropout computation.

Each op first offers its arguments to the eager entry point of the compiled backend
(``dispatch.fast_path``): inputs already in the form the kernels take (plain tensors of one
dtype, contiguous, on one device, no autocast) go to the op in one C++ call.  Everything else,
and every call under ``torch.compile``, takes the general path below, which converts the inputs
or raises an error naming the problem, then runs the chosen backend.
"""
from __future__ import annotations

import torch

from . import dispatch
from . import validation as check


def _gate(alpha, like: torch.Tensor) -> torch.Tensor:
    """alpha as a 1-element or per-channel tensor; a Python number becomes a tensor in the
    data's math dtype (float64 for float64 data, so nothing is rounded), a 0-dim tensor one of
    shape (1,)."""
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.full((1,), float(alpha), dtype=dtype, device=like.device)
    alpha = check.tensor("alpha", alpha)
    return alpha.reshape(1) if alpha.dim() == 0 else alpha


def _bias(bias, channels: int, like: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.zeros(channels, dtype=like.dtype, device=like.device)
    return check.tensor("bias", bias)


def rezero_residual(x, fx, alpha, dropout_p=0.0, training=True, backend="auto"):
    """``x + alpha * dropout(fx)``: the ReZero residual update of one sublayer."""
    if training and dropout_p and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, x)
    if fast is not None:
        out = fast.residual(x, fx, alpha, dropout_p, training)
        if out is not None:
            return out
    x, fx = check.tensor("x", x), check.tensor("fx", fx)
    if x.dim() == 0 and fx.dim() == 0:  # as (1,); eager's broadcast keeps (1,) for a (1,) gate
        out = rezero_residual(x.reshape(1), fx.reshape(1), alpha, dropout_p, training, backend)
        return out if isinstance(alpha, torch.Tensor) and alpha.dim() == 1 else out.reshape(())
    alpha = _gate(alpha, x)
    check.same_shape("x", x, "fx", fx)
    check.channel_vector("alpha", alpha, check.last_dim("x", x), allow_scalar=True)
    device = check.same_device(x=x, fx=fx, alpha=alpha)
    p = check.dropout_p(dropout_p, training)
    dtype = check.common_dtype(x, fx)
    impl = dispatch.implementation(dispatch.select(backend, device))
    return impl.rezero_residual(check.as_dtype(x, dtype), check.as_dtype(fx, dtype), alpha, p)


def bias_act_dropout(h, bias, activation="gelu", dropout_p=0.0, training=True, backend="auto"):
    """``dropout(act(h + bias))``: the epilogue of a feed-forward block's first GEMM.

    ``activation`` is a name of ``python_ref.ACTIVATIONS`` (python_ref/activations.py).
    """
    if training and dropout_p and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, h)
    if fast is not None:
        out = fast.bias_act_dropout(h, bias, activation, dropout_p, training)
        if out is not None:
            return out
    h = check.tensor("h", h)
    channels = check.last_dim("h", h)
    bias = _bias(bias, channels, h)
    check.channel_vector("bias", bias, channels, allow_scalar=False)
    device = check.same_device(h=h, bias=bias)
    activation = check.activation(activation)
    p = check.dropout_p(dropout_p, training)
    impl = dispatch.implementation(dispatch.select(backend, device))
    return impl.bias_act_dropout(h, bias, activation, p)


def gated_act_dropout(gate_up, activation="silu", dropout_p=0.0, training=True, backend="auto"):
    """``dropout(act(g) * u)`` with ``[g | u]`` the halves of ``gate_up``'s last dimension: a
    gated MLP's hidden (SwiGLU for silu, GeGLU for gelu) after the one GEMM that computes gate
    and up together.  The result has half of ``gate_up``'s last dimension.  Kept for backward:
    ``gate_up`` and the dropout seed (never the product or a mask).

    ``activation`` is a name of ``python_ref.ACTIVATIONS`` (python_ref/activations.py).
    """
    if training and dropout_p and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, gate_up)
    if fast is not None:
        out = fast.gated_act_dropout(gate_up, activation, dropout_p, training)
        if out is not None:
            return out
    gate_up = check.tensor("gate_up", gate_up)
    check.gate_up_halves("gate_up", gate_up)
    activation = check.activation(activation)
    p = check.dropout_p(dropout_p, training)
    impl = dispatch.implementation(dispatch.select(backend, gate_up.device))
    return impl.gated_act_dropout(gate_up, activation, p)


def _gemm_checked(inp, weight, bias):
    """(out_features, bias as a tensor) of a well-formed ``inp @ weight.T + bias``."""
    out_features = check.gemm_operands(inp, weight)
    bias = _bias(bias, out_features, weight)
    check.channel_vector("bias", bias, out_features, allow_scalar=False)
    return out_features, bias


def _gemm_operands(device: torch.device, *tensors: torch.Tensor):
    """The GEMM operands in one dtype: cast as ``torch.autocast`` casts ``F.linear``'s (fp64 is
    left alone), then promoted as eager would."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        tensors = tuple(t if t.dtype == torch.float64 else check.as_dtype(t, dtype)
                        for t in tensors)
    dtype = check.common_dtype(*tensors)
    return tuple(check.as_dtype(t, dtype) for t in tensors)


def rezero_linear(x, inp, weight, bias, alpha, dropout_p=0.0, training=True, backend="auto"):
    """``x + alpha * dropout(inp @ weight.T + bias)``: a sublayer's output projection and its
    ReZero residual update in one op (``bias`` may be None)."""
    if training and dropout_p and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, x)
    if fast is not None:
        out = fast.rezero_linear(x, inp, weight, bias, alpha, dropout_p, training)
        if out is not None:
            return out
    x = check.tensor("x", x)
    out_features, bias = _gemm_checked(inp, weight, bias)
    if x.shape != inp.shape[:-1] + (out_features,):
        raise ValueError(f"x must have shape {tuple(inp.shape[:-1]) + (out_features,)} "
                         f"(inp's leading dims, weight's out_features), got {tuple(x.shape)}")
    alpha = _gate(alpha, x)
    check.channel_vector("alpha", alpha, out_features, allow_scalar=True)
    device = check.same_device(x=x, inp=inp, weight=weight, bias=bias, alpha=alpha)
    p = check.dropout_p(dropout_p, training)
    inp, weight, bias = _gemm_operands(device, inp, weight, bias)
    # the result's dtype, as eager's x + F
    x = check.as_dtype(x, torch.promote_types(x.dtype, inp.dtype))
    impl = dispatch.implementation(dispatch.select(backend, device))
    return impl.rezero_linear(x, inp, weight, bias, alpha, p)


def rezero_gated_linear(x, gate_up, weight, alpha, activation="silu", mlp_dropout_p=0.0,
                        dropout_p=0.0, training=True, backend="auto"):
    """``x + alpha * dropout(h @ weight.T)`` with ``h = gated_act_dropout(gate_up, activation,
    mlp_dropout_p)``: a gated MLP's down projection and its ReZero residual update (no bias).

    The same as ``rezero_linear(x, gated_act_dropout(gate_up, ...), weight, None, alpha, ...)``,
    but the compiled backends keep only ``gate_up`` (which the gated activation keeps anyway),
    ``weight``, ``alpha`` and two seeds, and recompute ``h`` in backward: a hidden-sized tensor
    less per layer, for one more elementwise pass.  (The triton backend composes the two ops and
    keeps ``h``.)
    """
    if training and (dropout_p or mlp_dropout_p) and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, x)
    if fast is not None:
        out = fast.rezero_gated_linear(x, gate_up, weight, alpha, activation, mlp_dropout_p,
                                       dropout_p, training)
        if out is not None:
            return out
    x, gate_up = check.tensor("x", x), check.tensor("gate_up", gate_up)
    check.tensor("weight", weight)
    hidden = check.gate_up_halves("gate_up", gate_up)
    if weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(f"weight must be (out_features, {hidden}) for gate_up of last dimension "
                         f"{2 * hidden}, got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    if x.shape != gate_up.shape[:-1] + (out_features,):
        raise ValueError(f"x must have shape {tuple(gate_up.shape[:-1]) + (out_features,)} "
                         f"(gate_up's leading dims, weight's out_features), got {tuple(x.shape)}")
    alpha = _gate(alpha, x)
    check.channel_vector("alpha", alpha, out_features, allow_scalar=True)
    device = check.same_device(x=x, gate_up=gate_up, weight=weight, alpha=alpha)
    activation = check.activation(activation)
    p_mlp = check.dropout_p(mlp_dropout_p, training)
    p = check.dropout_p(dropout_p, training)
    gate_up, weight = _gemm_operands(device, gate_up, weight)
    x = check.as_dtype(x, torch.promote_types(x.dtype, gate_up.dtype))
    impl = dispatch.implementation(dispatch.select(backend, device))
    return impl.rezero_gated_linear(x, gate_up, weight, alpha, activation, p_mlp, p)


def linear_bias_act_dropout(inp, weight, bias, activation="gelu", dropout_p=0.0, training=True,
                            backend="auto"):
    """``dropout(act(inp @ weight.T + bias))``: a feed-forward block's first GEMM and its
    epilogue (the Triton backend fuses the epilogue into the GEMM; others run a GEMM, then the
    fused ``bias_act_dropout``)."""
    if training and dropout_p and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, inp)
    if fast is not None:
        out = fast.linear_bias_act_dropout(inp, weight, bias, activation, dropout_p, training)
        if out is not None:
            return out
    _, bias = _gemm_checked(inp, weight, bias)
    device = check.same_device(inp=inp, weight=weight, bias=bias)
    activation = check.activation(activation)
    p = check.dropout_p(dropout_p, training)
    inp, weight, bias = _gemm_operands(device, inp, weight, bias)
    impl = dispatch.implementation(dispatch.select(backend, device))
    return impl.linear_bias_act_dropout(inp, weight, bias, activation, p)


def rezero_fc(x, weight, bias, alpha, activation="relu", dropout_p=0.0, training=True,
              backend="auto"):
    """``x + alpha * dropout(act(x @ weight.T + bias))``: a whole ReZero fully connected block
    (``weight`` is square) in one op, which saves a deep narrow net most of its host time."""
    if training and dropout_p and torch._C._are_functorch_transforms_active():
        check.dropout_under_vmap(backend)
    fast = dispatch.fast_path(backend, x)
    if fast is not None:
        out = fast.rezero_fc(x, weight, bias, alpha, activation, dropout_p, training)
        if out is not None:
            return out
    x = check.tensor("x", x)
    channels, bias = _gemm_checked(x, weight, bias)
    if channels != x.shape[-1]:
        raise ValueError(f"weight must be square ({x.shape[-1]}, {x.shape[-1]}) so that the "
                         f"block keeps x's width, got {tuple(weight.shape)}")
    alpha = _gate(alpha, x)
    check.channel_vector("alpha", alpha, channels, allow_scalar=True)
    device = check.same_device(x=x, weight=weight, bias=bias, alpha=alpha)
    activation = check.activation(activation)
    p = check.dropout_p(dropout_p, training)
    if torch.is_autocast_enabled(device.type):
        # the GEMM runs in the autocast dtype while the residual stream keeps x's, as in eager
        h = linear_bias_act_dropout(x, weight, bias, activation, 0.0, training, backend)
        return rezero_residual(x, h, alpha, p, training, backend)
    x, weight, bias = _gemm_operands(device, x, weight, bias)
    impl = dispatch.implementation(dispatch.select(backend, device))
    return impl.rezero_fc(x, weight, bias, alpha, activation, p)
