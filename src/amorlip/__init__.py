"""amorlip: resource-efficient CLIP pretraining (AmorLIP and its baselines) on open_clip models."""

__version__ = "0.1.0"
