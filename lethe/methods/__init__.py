"""Methods, one file each. Importing this package registers every built-in method."""
from lethe.methods import ewc, joint, lwf, naive, replay  # noqa: F401
