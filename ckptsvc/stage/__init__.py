"""The trainer side of a save (torch): a state becomes components, each is flattened and
planned into files (``component_plan``, ``sharded_plan``), copied into a shared-memory arena
(``arena``), possibly overlapped with training (``overlap``) or streamed in pieces
(``piecewise``); ``save_handle`` is what ``save`` returns."""
