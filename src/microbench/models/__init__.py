"""Backbone adapters and LightningModules (zero-shot scoring; probes, fine-tuning and heads to come)."""
