"""segflow: batch segmentation of large image corpora.

The library (this package) is usable on its own: it imports neither Ray nor Prefect.
``workers/`` (Ray actors) and ``pipelines/`` (Prefect flows) are thin layers over it.
"""

__version__ = "0.1.0"
