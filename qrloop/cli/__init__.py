"""The composition root: the ``qrloop`` command line, the daemon and its supervisor, demo, doctor, smoke.

The only package that imports the components (``streams``, ``learner``, ``simulators``); it builds their
parts from the settings (a policy store, a search function) and passes them down. Nothing imports it but
``qrloop.__main__``. The typer app is ``qrloop.cli.main.app`` (the ``qrloop`` console script).
"""
