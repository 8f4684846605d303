"""Finding and reading checkpoints: classification (``discovery``), the latest usable one
(``latest``), verification (``verify``), and the loaders - state and components
(``component_load``), weights (``weights``), regions of sharded tensors (``regions``),
older layouts (``legacy``); the node-local cache of replicated files (``node_cache``).
Every loader refuses an unloadable checkpoint through ``discovery.refuse_unloadable``."""
