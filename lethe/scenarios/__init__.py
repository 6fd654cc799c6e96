"""Stream builders. Importing this package registers every built-in scenario."""
from lethe.scenarios import avalanche_classic, image_folder, split_digits  # noqa: F401
