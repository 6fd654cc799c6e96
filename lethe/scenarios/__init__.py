"""Stream builders. Importing this package registers every built-in scenario."""
from lethe.scenarios import avalanche_classic, image_folder, split_digits  # noqa: F401
from lethe.scenarios import model_update  # noqa: F401
from lethe.scenarios import lm_corpora, text  # noqa: F401
from lethe.scenarios import tofu  # noqa: F401
