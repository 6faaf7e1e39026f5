"""terrasynth: unified multimodal Earth-observation generation."""

__version__ = "0.1.0"
