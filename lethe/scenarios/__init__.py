"""Stream builders, one file each.

:func:`lethe.registry.load_all` imports every module of this package that calls a
``register_*`` decorator, so adding one is adding a file: no list to edit.
"""
