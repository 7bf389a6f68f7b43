"""Where each layer runs: the pure planner, the nodes it plans over, and the load options.

Import the submodules directly (``exo_lab.planning.planner`` needs numpy; ``options`` does not,
so reading a config.yaml stays light)."""
