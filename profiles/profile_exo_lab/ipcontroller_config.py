# ipyparallel controller settings exo-lab runs with: exo_lab/membership/launch.py passes the
# same values on the controller's command line (controller_args); tests/test_profiles.py checks
# that the two agree.
# Use this profile for your own ipcluster:  ipcluster start --profile-dir=profiles/profile_exo_lab -n 2
c = get_config()  # noqa: F821

# A dead engine is noticed within period x (misses + 1) = 5 s.
c.HeartMonitor.period = 1000
c.HeartMonitor.max_heartmonitor_misses = 4
# exo-lab keeps no task history: per-token traffic never rides ipyparallel anyway.
c.IPController.db_class = "NoDB"
# Not set here: for a cluster of PCs exo-lab also passes --ports with the 30 ports that start at
# network.controller_port (inside network.port_range, the range the firewall allows); a
# controller of your own on one PC needs no fixed ports.
