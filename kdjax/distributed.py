"""Multi-host start-up: jax.distributed.initialize() before any other JAX call."""

import jax


def initialize(config) -> None:
    """Join the multi-host job. With no explicit addresses JAX detects the cluster
    (TPU pods, SLURM, Open MPI); config.distributed gives them by hand."""
    d = config.get("distributed", None)
    kwargs = {}
    if d is not None and d.get("coordinator_address", ""):
        kwargs = dict(coordinator_address=d.coordinator_address,
                      num_processes=int(d.num_processes), process_id=int(d.process_id))
    if d is not None and d.get("cpu_collectives", False):  # CPU-only jobs (and tests)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
