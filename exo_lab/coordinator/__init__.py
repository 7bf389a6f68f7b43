"""The coordinator side: EngineControl (the ipyparallel control plane), the pipeline loader,
the scheduler that drives requests over the data plane, its event-loop thread, metrics and
status. The thin :class:`exo_lab.Cluster` facade ties them together."""
