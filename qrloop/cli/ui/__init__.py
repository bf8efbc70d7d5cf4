"""The operator's view: the status page (``qrloop ui``), its plots, the terminal summary (``qrloop status``).

All of it renders :mod:`qrloop.status`'s summary and nothing else; it reads, never writes.
"""
