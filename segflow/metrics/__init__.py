"""Mergeable metric state: ``reset / update / merge / compute``.

Workers update a metric per shard and return its state; the flow merges the states. Every
state is integer sums, so merging in any order gives the same dataset result bit for bit.
"""
