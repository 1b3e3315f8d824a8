"""Scale: a FAISS vector index (candidate pools, "more like this", near-duplicates) and embedding on Ray.

Nothing heavy is imported here; ``raresift.scale.index`` imports FAISS and
``raresift.scale.ray_engine`` imports Ray, each only when used.
"""
