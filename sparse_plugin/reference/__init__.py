"""Faithful reference implementations (HF transformers), for validation; not for serving."""
