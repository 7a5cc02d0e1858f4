"""Entry points: python -m launch.train, launch.make_shards, launch.make_synthetic."""
