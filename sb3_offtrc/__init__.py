"""sb3-offtrc: Off-Policy TRC for Stable-Baselines3."""

__version__ = "0.1.0"
