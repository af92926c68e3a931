"""Mergeable metric state: ``reset / update / merge / state / compute``.

Workers update a metric per shard and return its state; the flow merges the states. Every
metric has these verbs: :class:`~segflow.metrics.semantic.ConfusionMatrix`,
:class:`~segflow.metrics.instance.CocoEvaluator`, and the scorers of
:mod:`segflow.scoring` built on them. Integer state merges in any order to the same dataset
result bit for bit; the reduction of summed state to figures is
:mod:`segflow.metrics.figures`, the one the workers and ``evaluate`` share.
"""
