# ipyparallel engine settings for exo-lab stages. Thread limits come from the environment that
# exo-lab sets per engine (OMP_NUM_THREADS = the device's max_cores; OMP_WAIT_POLICY=PASSIVE so
# a waiting stage does not spin on the cores its neighbour computes with).
c = get_config()  # noqa: F821

# Engines keep their live stage in the namespace as `exo_stage` for %%px experiments.
c.IPEngine.log_level = "WARN"
