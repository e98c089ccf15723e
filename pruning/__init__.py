"""Visual-token pruning: [CLS]-attention selection with a temporal budget (FasterVLM) and FastV.

Pure torch + transformers, no I/O.
"""
