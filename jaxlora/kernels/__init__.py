"""Pallas kernels, each with a plain-jnp reference beside it and an ``interpret`` flag.

Which kernel a program runs is not decided here: the caller passes it (``platform`` /
``kernel``, ``interpret``), and :mod:`jaxlora.weights.dispatch` decides from the devices the
program is built for.
"""

# Block sizes the fused NF4 kernels accept: a K tile must hold whole absmax blocks.
KERNEL_BLOCKSIZES = (32, 64, 128)
