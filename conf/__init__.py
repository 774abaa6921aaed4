"""The configuration: the YAML tree Hydra composes, and its typed schema (conf/schema.py), whose sections are
defined and checked beside their code. Every package may import conf; conf imports only config sections."""
