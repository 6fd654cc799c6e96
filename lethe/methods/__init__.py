"""Methods, one file each. Importing this package registers every built-in method."""
from lethe.methods import ewc, joint, lwf, mos, naive, replay  # noqa: F401
from lethe.methods import clr, rewarm  # noqa: F401
from lethe.methods import retrain, s3t, sisa  # noqa: F401
from lethe.methods import compat, muscle, pct  # noqa: F401
from lethe.methods import conpet, hft  # noqa: F401
from lethe.methods import grad_ascent, grad_diff, loku, relearn  # noqa: F401
