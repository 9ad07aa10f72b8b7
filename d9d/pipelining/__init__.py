"""Pipeline parallelism: stage description, layer split and schedule helpers."""
