"""Runner services: the preprocessing and model services that the API service composes."""
