"""AutoML for product analytics as a Dagster asset graph.

Kept free of imports so that the SageMaker entry script can import ``automl_assets.core`` without Dagster.
"""
