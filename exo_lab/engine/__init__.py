"""What runs inside an ipyparallel engine: the resource probe and the stage worker.

Engine-side code never imports coordinator code; the coordinator calls these functions through
ipyparallel (exo_lab.coordinator.control.EngineControl)."""
