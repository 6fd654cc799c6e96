"""Model builders. Importing this package registers every built-in model."""
from lethe.models import vision  # noqa: F401
from lethe.models import hf  # noqa: F401
