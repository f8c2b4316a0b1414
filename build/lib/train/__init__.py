"""The ``python -m train`` entry point (see ``train/__main__.py``)."""
