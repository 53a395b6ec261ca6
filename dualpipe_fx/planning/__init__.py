"""Planning without ranks: the simulator, timelines and the memory plan. Pure: it takes programs,
stage graphs or their costs and returns numbers; it imports neither ``api`` nor ``runtime``."""
