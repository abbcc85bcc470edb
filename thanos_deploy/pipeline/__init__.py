"""The sequential pipeline: calibration inputs flow through the decoder layers one at a time; per
layer, the statistics of every linear are collected, the method prunes it, and the pruned layer's
outputs feed the next (sequential.py). Around it: the statistics (stats.py), numerics checks,
resumable runs (resume.py), layers read from disk one at a time (offload.py) and activations kept
on disk between layers (activations.py).

Import what you need from its module, e.g. `from thanos_deploy.pipeline.sequential import compress_model`.
"""
