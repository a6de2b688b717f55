"""Continual-learning methods: one file, one class each; Hydra's ``_target_`` is the registry.

Nothing is imported here: a run imports only the methods its config names (``conf/method/<name>.yaml``).
"""
