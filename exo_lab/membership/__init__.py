"""Who is in the cluster: the machinery that brings PCs in and keeps their files coming.

- :mod:`.discovery`: the zeroconf advert, the signed join request and its answer;
- :mod:`.service`: the coordinator's join (and, with the storage role, model-file) HTTP service;
- :mod:`.storage`: the storage PC's model-file server (safetensors by tensor ranges);
- :mod:`.launch`: the ipyparallel controller and engines this PC starts, their connection files;
- :mod:`.launchers`: starting other PCs' workers over SSH or Slurm.

The serving runtime that uses the engines once they are in lives in :mod:`exo_lab.coordinator`.
"""
