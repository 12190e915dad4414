"""Importance-weighted fine-tuning (`drift train`) and the mask viewer (`drift inspect`).

`data` turns weighted rows into token ids, loss masks and batches; `trainer` is the weighted
loss on a minimal `transformers.Trainer` subclass; `inspect` shows which tokens are trained.
"""
