"""fgdistill.engine: training runs from configs, and inference with trained detectors.

:func:`fgdistill.engine.runner.train` trains or distils from a
:class:`~fgdistill.engine.config.TrainConfig`; :mod:`fgdistill.engine.inference` evaluates and
predicts. Nothing is imported here, so that ``fgdistill.engine.config`` stays cheap to import.
"""
