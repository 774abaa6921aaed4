"""Launchers: local (torchrun), SLURM, Kubernetes — one entry point everywhere."""
