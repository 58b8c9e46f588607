"""Data: the ShapesWorld generator and its pixel analyser, plus webdataset shard reading."""
