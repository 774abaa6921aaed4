"""Hydra configuration tree (YAML); the typed schema lives in train/config.py."""
