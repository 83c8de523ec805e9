"""Training: the run builder (:mod:`~jaxlora.training.run`) that ``train``, ``export`` and
``plan`` share, the jitted step, optimizer, sharding, checkpoints, monitoring, evaluation, and
the loop itself (:mod:`~jaxlora.training.loop`)."""
