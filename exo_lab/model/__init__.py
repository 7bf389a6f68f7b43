"""Model files: resolving ids to folders (resolve), their byte profile (profile), one stage's
layers (shard), and the models exo-lab builds or fetches itself (demo, smollm2)."""
