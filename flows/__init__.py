"""Prefect flows chaining pipeline/, annotation/ and model/ into one DAG. They hold no logic of their own."""
