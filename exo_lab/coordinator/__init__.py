"""The serving runtime on the coordinator, one job: run the loaded model for its requests.

- :mod:`.supervisor`: the one owner of the cluster's life (a state machine: load, re-plan,
  failover, stop);
- :mod:`.control`: EngineControl, the ipyparallel control plane to the engines;
- :mod:`.pipeline`: plans and loads a model into stages (a Pipeline);
- :mod:`.schedule`: the pure scheduling core (StepPlan in, results out; no I/O);
- :mod:`.scheduler`: its runner over the data-plane sockets; :mod:`.tenants`, :mod:`.metrics`,
  :mod:`.text`, :mod:`.chat` what it uses;
- :mod:`.status`, :mod:`.loop`: the status report and the event-loop thread.

How PCs get into the cluster (discovery, join, storage, launchers) is :mod:`exo_lab.membership`;
the thin :class:`exo_lab.Cluster` facade ties the two together.
"""
