"""Every environment variable exo-lab reads or sets, named once here (a module that imports
nothing, so any process reads it cheaply). Users set the first five; exo-lab sets the rest for
the processes it starts.
"""
from __future__ import annotations

# set by users
CACHE = "EXO_LAB_CACHE"            # the cache folder (models, fetched tensors, kernels): exo_lab.paths
HOME = "EXO_LAB_HOME"              # the state folder (ipyparallel profiles): exo_lab.paths
SECRET = "EXO_LAB_SECRET"          # the cluster secret; wins over network.secret_file: exo_lab.security
API_KEY = "EXO_LAB_API_KEY"        # the API's Bearer key when the config names none: exo_lab.server
KERNELS = "EXO_LAB_KERNELS"        # "0": torch's kernels instead of exo-lab's own: exo_lab.model.cpu_kernels

# set by exo-lab for the processes it starts
DEVICE = "EXO_LAB_DEVICE"                  # the config hostname an engine's worker joined as
ADVERTISE_HOST = "EXO_LAB_ADVERTISE_HOST"  # an engine's LAN address, as the coordinator saw it
STORAGE_URL = "EXO_LAB_STORAGE_URL"        # where an engine fetches model files: exo_lab.engine.fetch
WATCH_PID = "EXO_LAB_WATCH_PID"            # the process a lifeline watches: exo_lab.lifeline
WATCH_START = "EXO_LAB_WATCH_START"        # ... and its start time (a reused pid is not it)

USER_SET = (CACHE, HOME, SECRET, API_KEY, KERNELS)
EXO_LAB_SET = (DEVICE, ADVERTISE_HOST, STORAGE_URL, WATCH_PID, WATCH_START)
