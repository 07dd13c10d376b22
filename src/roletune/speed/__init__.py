"""Speed and memory levers: each one optional, each measured (docs/speed.md).

A lever knows the model and its config, never the Trainer or the batching: the engine (roletune.training)
and the verbs apply them.
"""
