"""Runtime support for edgeglm: hardware probing and inference backends."""
