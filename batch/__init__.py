"""Batch scoring: a file or a query into a database table (and on Spark), with the served models."""
