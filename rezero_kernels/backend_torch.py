"""The "torch" backend: the plain-PyTorch reference (``python_ref``), any device."""
import python_ref.functional as ref


def rezero_residual(x, fx, alpha, dropout_p):
    return ref.rezero_residual(x, fx, alpha, dropout_p)


def bias_act_dropout(h, bias, activation, dropout_p):
    return ref.bias_act_dropout(h, bias, activation, dropout_p)


def gated_act_dropout(gate_up, activation, dropout_p):
    return ref.gated_act_dropout(gate_up, activation, dropout_p)


def rezero_gated_linear(x, gate_up, weight, alpha, activation, mlp_dropout_p, dropout_p):
    return ref.rezero_gated_linear(x, gate_up, weight, alpha, activation, mlp_dropout_p, dropout_p)


def rezero_linear(x, inp, weight, bias, alpha, dropout_p):
    return ref.rezero_linear(x, inp, weight, bias, alpha, dropout_p)


def linear_bias_act_dropout(inp, weight, bias, activation, dropout_p):
    return ref.linear_bias_act_dropout(inp, weight, bias, activation, dropout_p)


def rezero_fc(x, weight, bias, alpha, activation, dropout_p):
    return ref.rezero_fc(x, weight, bias, alpha, activation, dropout_p)
