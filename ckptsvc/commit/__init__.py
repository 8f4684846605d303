"""How a save commits: the claim of its directory (``target``), the reports of every rank
merged (``reports``) and the coordination of ranks through the job's store without
collectives (``coordinator``)."""
