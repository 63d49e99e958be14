"""The activation codes of csrc/kernel_math.h (``ActCode``), once for the Python side:
fastmlp.ops passes them to the kernels, fastmlp.reference mirrors the kernels' rules by
them, fastmlp.plan writes them into the step plan, fastmlp.layers checks names against
them. Pure Python (the reference imports it without the compiled module)."""

# name -> code; gelu is the exact (erf) one, elu has alpha 1, leaky_relu slope 0.2
# (Keras' default). "softmax" is not elementwise: the softmax-cross-entropy ops do it.
ACTIVATIONS = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3, "gelu": 4, "silu": 5,
               "swish": 5, "elu": 6, "softplus": 7, "leaky_relu": 8}

# Codes whose derivative needs the pre-activation (kernel_math.h act_needs_input):
# gelu, silu, softplus. The others are computed from the output.
NEEDS_INPUT = frozenset((4, 5, 7))
