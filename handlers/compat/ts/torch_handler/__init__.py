"""``ts.torch_handler``: the built-in handlers, as marserve's own modules.

Each submodule makes its name an alias of the marserve module (``sys.modules[__name__] = ...``),
not a copy of its classes: the worker's loader instantiates the one class *defined in* the module
it imported, so ``--handler image_classifier`` resolved through ``ts.torch_handler`` must land on
the module that defines ImageClassifier, and ``ts...ImageClassifier is handlers...ImageClassifier``.
"""
