"""Measuring a model: evaluation on generated scenes, calibration of the default threshold, and the class example pool they share."""
