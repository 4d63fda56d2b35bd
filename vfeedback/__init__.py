"""vfeedback: reward-feedback fine-tuning of diffusion models."""
__version__ = "0.1.0"
