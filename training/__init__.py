"""Training: data, fitting, MLflow tracking and registry, import into the BentoML store."""
