"""Comparison dashboards: MLflow runs → self-contained HTML pages (`lethe compare`)."""
