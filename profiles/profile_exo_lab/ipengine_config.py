# ipyparallel engine settings exo-lab runs with: `python -m exo_lab.worker` starts each engine
# with --log-level=WARN (tests/test_profiles.py checks that the two agree).
#
# Thread limits are not engine settings: exo-lab puts them in each engine's environment before
# torch is imported there (exo_lab/membership/launch.py, engine_environment):
# OMP_NUM_THREADS and MKL_NUM_THREADS = the device's max_cores. OpenMP keeps its default wait
# policy: PASSIVE made decode steps about 2x slower. For your own ipcluster, export them yourself.
# An engine that holds a pipeline stage keeps it in its namespace as `exo_stage`, for %%px.
c = get_config()  # noqa: F821

c.IPEngine.log_level = "WARN"
