"""A corpus and models for trying segflow without downloading anything.

:mod:`segflow.demo.corpus` generates aerial-style scenes with their label maps and COCO
instances; :mod:`segflow.demo.train` trains the small U-Net whose exports live in
``models/demo/``.
"""
