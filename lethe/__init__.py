"""lethe — an experiment platform for continual learning and machine unlearning."""

__version__ = "0.1.0"
